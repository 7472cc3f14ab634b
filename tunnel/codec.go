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

// encodeMessage marshals m with codec and, if comp is not nil, compresses
// it. It returns the bytes to send and the marshalled length; as in gRPC,
// the send limit applies to the bytes sent.
func encodeMessage(codec encoding.CodecV2, comp encoding.Compressor, maxSend int, m any) (mem.BufferSlice, int, error) {
	data, err := codec.Marshal(m)
	if err != nil {
		return nil, 0, errMarshal(err)
	}
	length := data.Len()
	if comp != nil {
		z, err := compress(comp, data)
		data.Free()
		if err != nil {
			return nil, 0, err
		}
		data = z
	}
	if size := data.Len(); size > maxSend {
		data.Free()
		return nil, 0, errSendTooLarge(size, maxSend)
	}
	return data, length, nil
}

// decodeMessage unmarshals a received message into m, decompressing it
// first if comp is not nil, within maxRecv bytes. It frees data and returns
// the message's length once decompressed.
func decodeMessage(codec encoding.CodecV2, comp encoding.Compressor, maxRecv int, data mem.BufferSlice, m any, side string) (int, error) {
	if comp != nil {
		out, err := decompress(comp, data, maxRecv)
		data.Free()
		if err != nil {
			return 0, err
		}
		data = out
	}
	length := data.Len()
	err := codec.Unmarshal(data, m)
	data.Free()
	if err != nil {
		return 0, errUnmarshal(side, err)
	}
	return length, nil
}
