package proxy_test

import (
	"bytes"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/proxy"
)

func TestFrameRoundTrip(t *testing.T) {
	in := &grpchantesting.Message{Payload: []byte("hello"), Count: 7}
	f, err := proxy.NewFrame(in)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := proto.Marshal(in)
	if !bytes.Equal(f.Bytes(), want) || f.Len() != len(want) {
		t.Fatalf("frame holds %x, want %x", f.Bytes(), want)
	}
	out := new(grpchantesting.Message)
	if err := f.Decode(out); err != nil || !proto.Equal(in, out) {
		t.Fatalf("Decode = %v, %v; want %v", out, err, in)
	}
	// Decoding does not consume the frame: it still has its bytes.
	if !bytes.Equal(f.Bytes(), want) {
		t.Fatal("Decode changed the frame")
	}

	// A frame goes through the proxy's codec as its bytes, and comes back
	// as an equal frame.
	c := proxy.Codec()
	data, err := c.Marshal(f)
	if err != nil || !bytes.Equal(data.Materialize(), want) {
		t.Fatalf("codec Marshal = %x, %v", data.Materialize(), err)
	}
	back := new(proxy.Frame)
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(want)}, back); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := back.Decode(out); err != nil || !proto.Equal(in, out) {
		t.Fatalf("through the codec: %v, %v", out, err)
	}
}

func TestFrameOf(t *testing.T) {
	b, _ := proto.Marshal(wrapperspb.String("raw"))
	got := new(wrapperspb.StringValue)
	if err := proxy.FrameOf(b).Decode(got); err != nil || got.GetValue() != "raw" {
		t.Fatalf("Decode = %q, %v", got.GetValue(), err)
	}
	// An empty message is an empty frame.
	if f := proxy.FrameOf(nil); f.Len() != 0 || f.Decode(new(wrapperspb.StringValue)) != nil {
		t.Fatal("empty frame")
	}
}

func TestFrameErrors(t *testing.T) {
	if err := proxy.FrameOf([]byte{0xff}).Decode(new(wrapperspb.StringValue)); err == nil {
		t.Error("decoding garbage succeeded")
	}
	var nilFrame *proxy.Frame
	if err := nilFrame.Decode(new(wrapperspb.StringValue)); err == nil {
		t.Error("decoding a nil frame succeeded")
	}
	// A message missing a required field cannot be encoded; none of the
	// well-known types has one, so an invalid UTF-8 string stands in.
	if _, err := proxy.NewFrame(wrapperspb.String("\xff")); err == nil {
		t.Error("encoding invalid UTF-8 succeeded")
	}
}
