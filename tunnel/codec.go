package tunnel

import (
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

// defaultCodec encodes tunneled messages unless a call chooses another.
func defaultCodec() encoding.CodecV2 { return encoding.GetCodecV2(proto.Name) }

// codecV1 adapts a legacy encoding.Codec (from grpc.ForceCodec) to the
// buffer-based interface used throughout the tunnel.
type codecV1 struct{ encoding.Codec }

func (c codecV1) Marshal(v any) (mem.BufferSlice, error) {
	b, err := c.Codec.Marshal(v)
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (c codecV1) Unmarshal(data mem.BufferSlice, v any) error {
	return c.Codec.Unmarshal(data.Materialize(), v)
}

// serverCodec is the codec of the end that handles calls.
func (o *options) serverCodec() encoding.CodecV2 {
	if o.codec != nil {
		return o.codec
	}
	return defaultCodec()
}
