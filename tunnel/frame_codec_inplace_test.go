package tunnel

import (
	"bytes"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// countingPool is a mem.BufferPool that counts the buffers given back, to
// tell when the last reference to a buffer is gone.
type countingPool struct{ returned atomic.Int32 }

func (p *countingPool) Get(n int) *[]byte {
	b := make([]byte, n)
	return &b
}

func (p *countingPool) Put(*[]byte) { p.returned.Add(1) }

// pooled is b in a buffer whose references gRPC counts, from p.
func pooled(p *countingPool, b []byte) mem.Buffer {
	c := append(make([]byte, 0, max(len(b), 2<<10)), b...)
	return mem.NewBuffer(&c, p)
}

// TestFrameCodecSendsLargeChunksInPlace: a data frame's chunk of at least
// minViewChunk goes out as a view of the buffer it lies in, which stays
// referenced until gRPC frees the encoding, even after its owner (the
// stream sending the message) has freed it; the bytes are those
// proto.Marshal writes. A smaller chunk is copied.
func TestFrameCodecSendsLargeChunksInPlace(t *testing.T) {
	for _, n := range []int{minViewChunk, 256 << 10, minViewChunk - 1} {
		var pool countingPool
		msg := pooled(&pool, bytesOf(n+10))
		chunk := msg.ReadOnlyData()[5 : 5+n]
		for _, fr := range []any{
			(&serverDataFrame{ServerToClient: tunnelpb.ServerToClient{StreamId: 3}}).first(uint32(n+10), chunk, msg),
			(&clientDataFrame{ClientToServer: tunnelpb.ClientToServer{StreamId: 3}}).next(chunk, msg),
		} {
			msg.Ref()
			out, err := Codec().Marshal(fr)
			if err != nil {
				t.Fatal(err)
			}
			msg.Free() // the sender is done with the message
			var want []byte
			switch f := fr.(type) {
			case *serverDataFrame:
				want, _ = proto.Marshal(&f.ServerToClient)
			case *clientDataFrame:
				want, _ = proto.Marshal(&f.ClientToServer)
			}
			if got := out.Materialize(); !bytes.Equal(got, want) {
				t.Fatalf("%d-byte chunk: encoding differs from proto.Marshal's", n)
			}
			inPlace := n >= minViewChunk
			if got := len(out) == 2 && &out[1].ReadOnlyData()[0] == &chunk[0]; got != inPlace {
				t.Fatalf("%d-byte chunk sent in place: %t, want %t", n, got, inPlace)
			}
			if pool.returned.Load() != 0 {
				t.Fatalf("%d-byte chunk: its buffer went back to the pool while the encoding held it", n)
			}
			out.Free()
		}
		msg.Free()
		if pool.returned.Load() != 1 {
			t.Fatalf("%d-byte chunk: buffer returned %d times after every reference was gone, want once", n, pool.returned.Load())
		}
	}
}

// TestFrameCodecReceivesInPlace: a received data frame's bytes stay in the
// buffers they arrived in, referenced until the reader resets the frame (or
// a holder frees its own reference), and read as protobuf reads them.
func TestFrameCodecReceivesInPlace(t *testing.T) {
	payload := bytesOf(40 << 10)
	want := &tunnelpb.ServerToClient{StreamId: 9, Frame: &tunnelpb.ServerToClient_ResponseMessage{
		ResponseMessage: &tunnelpb.MessageData{Size: 50 << 10, Data: payload},
	}}
	b, _ := proto.Marshal(want)
	var pool countingPool
	cut := len(b) / 3
	data := mem.BufferSlice{pooled(&pool, b[:cut]), pooled(&pool, b[cut:])}
	f := new(receivedServerFrame)
	if err := Codec().Unmarshal(data, f); err != nil {
		t.Fatal(err)
	}
	data.Free() // as gRPC does once Unmarshal returns
	if f.GetStreamId() != 9 || f.GetResponseMessage().GetSize() != 50<<10 {
		t.Fatalf("decoded %v", &f.ServerToClient)
	}
	c := f.payload()
	if len(c.pieces) != 2 || c.len != len(payload) {
		t.Fatalf("payload in %d pieces of %d bytes, want 2 of %d", len(c.pieces), c.len, len(payload))
	}
	var got []byte
	for _, p := range c.pieces {
		got = append(got, p.data...)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("payload differs")
	}
	// A holder keeps the second piece past the frame.
	kept := c.pieces[1]
	kept.ref()
	f.reset()
	if n := pool.returned.Load(); n != 1 {
		t.Fatalf("%d buffers returned after the reset, want the one no one holds", n)
	}
	kept.free()
	if n := pool.returned.Load(); n != 2 {
		t.Fatalf("%d buffers returned after the holder let go, want 2", n)
	}
}
