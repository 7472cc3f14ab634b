package proxy

import (
	"fmt"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// NewFrame encodes msg as a Frame, for code that hands the proxy a message
// of its own: a director's replacement for a request, a reply made up
// without a backend, or a test that sends through the proxy's codec. The
// frame holds msg's encoding as of the call; later changes to msg do not
// show.
func NewFrame(msg proto.Message) (*Frame, error) {
	b, err := proto.Marshal(msg)
	if err != nil {
		return nil, fmt.Errorf("proxy: encoding %T as a frame: %w", msg, err)
	}
	return FrameOf(b), nil
}

// FrameOf wraps b, an already encoded message, as a Frame without copying
// it, for a message that arrives as bytes (from [Call.Peek], a file or
// another protocol). The frame takes b over: do not change b afterwards.
func FrameOf(b []byte) *Frame {
	return &Frame{data: mem.BufferSlice{mem.SliceBuffer(b)}}
}

// Decode parses the frame's bytes into msg, for a director or interceptor
// that needs a message's content: a routing key, a tenant, a field to
// check. The frame is unchanged and still forwarded as it was received;
// decoding is the one place the proxy needs the message's schema. Unknown
// fields, such as a fan-out's label, are kept in msg's unknown fields.
func (f *Frame) Decode(msg proto.Message) error {
	if f == nil {
		return fmt.Errorf("proxy: decoding a nil frame")
	}
	if err := proto.Unmarshal(f.view(), msg); err != nil {
		return fmt.Errorf("proxy: decoding a frame as %T: %w", msg, err)
	}
	return nil
}
