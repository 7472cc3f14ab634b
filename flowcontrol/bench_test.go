package flowcontrol

import (
	"testing"
	"time"
)

// BenchmarkSendWindow is the sender's cost per chunk: take credit, and get
// it back from a window update.
func BenchmarkSendWindow(b *testing.B) {
	w := NewSendWindow(DefaultWindow)
	b.ReportAllocs()
	for b.Loop() {
		n, _ := w.Take(16384, nil)
		_ = w.Add(uint32(n))
	}
}

// BenchmarkRecvWindow is the receiver's cost per chunk with autotuning on:
// check it against the grant, then consume it.
func BenchmarkRecvWindow(b *testing.B) {
	w := NewRecvWindow(DefaultWindow, DefaultWindow)
	w.AutoTune(16<<20, time.Second, &Hint{})
	b.ReportAllocs()
	for b.Loop() {
		if err := w.Receive(16384); err != nil {
			b.Fatal(err)
		}
		w.Consume(16384)
	}
}

// BenchmarkChunk cuts a 1 MiB message in three buffers into 16 KiB chunks.
func BenchmarkChunk(b *testing.B) {
	msg := [][]byte{make([]byte, 300<<10), make([]byte, 600<<10), make([]byte, 124<<10)}
	bufs := make([][]byte, len(msg))
	b.ReportAllocs()
	for b.Loop() {
		copy(bufs, msg)
		rest := bufs
		for {
			var c []byte
			if c, rest = Chunk(rest, MaxChunk); c == nil {
				break
			}
		}
	}
}
