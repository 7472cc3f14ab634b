package proxy

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

// Frame is one message in flight through the proxy, as the bytes it was
// received as. The proxy hands the buffers on without copying them.
type Frame struct {
	data mem.BufferSlice
}

// Bytes returns the message's bytes, copied into one slice, for a Director
// that peeks at a message.
func (f *Frame) Bytes() []byte { return f.data.Materialize() }

// Len is the message's length in bytes.
func (f *Frame) Len() int { return f.data.Len() }

// view returns the message's bytes without copying when they are in one
// buffer, and copies them into one slice otherwise.
func (f *Frame) view() []byte {
	if len(f.data) == 1 {
		return f.data[0].ReadOnlyData()
	}
	return f.data.Materialize()
}

// free releases the frame's buffers.
func (f *Frame) free() {
	f.data.Free()
	f.data = nil
}

// codec passes *Frame values through as raw bytes and hands every other
// type to gRPC's proto codec, so that a server using it for the proxy still
// serves its ordinary services.
type codec struct {
	fallback encoding.CodecV2
}

// Codec returns the codec the proxy needs on the server that receives the
// calls it forwards: it keeps a *Frame's bytes as they are, and delegates
// every other message type to the proto codec. Its name is "proto", since
// that is what clients ask for.
func Codec() encoding.CodecV2 {
	return codec{fallback: encoding.GetCodecV2(proto.Name)}
}

// CodecOver is Codec with every message that is not a proxied one handed to
// fallback instead of the proto codec: a server that both proxies calls
// and accepts tunnels, as the gateway does, uses
// CodecOver(tunnel.Codec()), so that tunnel frames are encoded without
// reflection too. fallback must be a protobuf codec, since the name stays
// "proto".
func CodecOver(fallback encoding.CodecV2) encoding.CodecV2 {
	return codec{fallback: fallback}
}

func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	f, ok := asFrame(v)
	if !ok {
		return c.fallback.Marshal(v)
	}
	if f == nil {
		return nil, fmt.Errorf("proxy: nil frame")
	}
	// gRPC frees what Marshal returns once it is written; the frame keeps
	// its own reference until the proxy frees it.
	f.data.Ref()
	return f.data, nil
}

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	f, ok := asFrame(v)
	if !ok {
		return c.fallback.Unmarshal(data, v)
	}
	// gRPC frees data after Unmarshal returns; keep it alive for the frame.
	data.Ref()
	f.data = data
	return nil
}

func (c codec) Name() string { return proto.Name }
