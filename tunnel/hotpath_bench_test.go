package tunnel

import (
	"testing"

	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// Benchmarks of the per-message work inside one end of a tunnel, without a
// network: what framing and reassembly cost in time and allocations.

// BenchmarkFraming frames a 1 MiB message into 256 KiB chunks and encodes
// them with the frame codec, for an outer stream that frees each encoding
// at once, as gRPC does once it has written it.
func BenchmarkFraming(b *testing.B) {
	out := newSender[*tunnelpb.ServerToClient](func(f any) error {
		data, err := Codec().Marshal(f)
		data.Free()
		return err
	}, nil)
	win := flowcontrol.Unlimited()
	fr := &serverDataFrame{ServerToClient: tunnelpb.ServerToClient{StreamId: 1}}
	data := mem.BufferSlice{mem.SliceBuffer(make([]byte, 1<<20))}
	b.SetBytes(1 << 20)
	b.ReportAllocs()
	for b.Loop() {
		if err := sendMessage(out, win, nil, fr, data, defaultMaxChunk); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReassembly feeds a 1 MiB message in 256 KiB chunks through the
// receive path, window accounting included, and takes it out.
func BenchmarkReassembly(b *testing.B) {
	data := bytesChunk(make([]byte, 256<<10))
	in := newInbound(flowcontrol.NewRecvWindow(1<<30, 1<<30), 0, 1<<30, &budget{limit: 1 << 40}, "request")
	b.SetBytes(1 << 20)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := in.startMessage(1<<20, &data); err != nil {
			b.Fatal(err)
		}
		for range 3 {
			if err := in.moreData(&data); err != nil {
				b.Fatal(err)
			}
		}
		m, _, err := in.recv(nil)
		if err != nil {
			b.Fatal(err)
		}
		m.gathered().Free()
	}
}
