package proxy

import (
	"bytes"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
)

// RegisterService forwards the methods methodNames of the service
// serviceName ("package.Service") through director, on a server that also
// serves services of its own: the way to put a proxy in front of a few
// methods, or a whole service whose methods are known, while everything
// else on the server is answered locally. It is Gitaly's
// proxy.RegisterService: every method is registered as a stream in both
// directions, which carries unary and streaming calls alike, and forwarded
// by [Handler] with opts.
//
// Unlike [ServerOptions], it works with whatever codec s has, gRPC's
// default proto codec included, so the server's own services need no
// change: forwarded messages are then copied once on the way in and once
// on the way out. On a server that uses [Codec] (grpc.ForceServerCodecV2)
// they are not copied at all.
//
// Methods of serviceName not listed are not forwarded: the server answers
// them with Unimplemented, or gives them to its unknown-service handler if
// it has one. To forward every method of services the server does not
// implement, whatever their names, use ServerOptions instead. It panics if
// methodNames is empty, since a service with no methods would only hide
// serviceName from an unknown-service handler, and, like
// grpc.Server.RegisterService, if serviceName is already registered on s.
func RegisterService(s grpc.ServiceRegistrar, director Director, serviceName string, methodNames ...string) {
	s.RegisterService(ServiceDesc(director, serviceName, methodNames), struct{}{})
}

// ServiceDesc returns the grpc.ServiceDesc that [RegisterService] registers,
// with opts for the handler (the label field of a fan-out, call options,
// backend errors): register it with s.RegisterService(desc, struct{}{}) on
// any grpc.ServiceRegistrar, such as a tunnel server (whose registrar, unlike
// grpc.Server's, wants a non-nil implementation, though the proxy uses
// none). It panics if methodNames is empty.
func ServiceDesc(director Director, serviceName string, methodNames []string, opts ...Option) *grpc.ServiceDesc {
	if len(methodNames) == 0 {
		panic(fmt.Sprintf("proxy: no methods to forward for service %q", serviceName))
	}
	h := Handler(director, opts...)
	handler := func(srv any, ss grpc.ServerStream) error {
		return h(srv, frameStream{ss})
	}
	desc := &grpc.ServiceDesc{
		ServiceName: serviceName,
		// No implementation is registered: the handler is all there is.
		HandlerType: (*any)(nil),
		Metadata:    "proxied",
	}
	for _, m := range methodNames {
		desc.Streams = append(desc.Streams, grpc.StreamDesc{
			StreamName:    m,
			Handler:       handler,
			ServerStreams: true,
			ClientStreams: true,
		})
	}
	return desc
}

// frameStream lets a server whose codec does not know Frames carry them:
// it hands the server each Frame as a protoFrame, which any protobuf codec
// encodes and decodes through its legacy Marshal and Unmarshal methods.
// Handler is written against Frames, and cannot know which codec the
// server it is registered on uses; [Codec] recognises a protoFrame as a
// Frame, so a server that uses it still forwards without copying.
type frameStream struct{ grpc.ServerStream }

func (s frameStream) RecvMsg(m any) error {
	if f, ok := m.(*Frame); ok {
		m = (*protoFrame)(f)
	}
	return s.ServerStream.RecvMsg(m)
}

func (s frameStream) SendMsg(m any) error {
	if f, ok := m.(*Frame); ok {
		m = (*protoFrame)(f)
	}
	return s.ServerStream.SendMsg(m)
}

// protoFrame is a Frame as a message of the protobuf runtime's legacy
// kind (golang/protobuf's v1 API, which gogo/protobuf messages still use):
// a type with Marshal and Unmarshal methods is encoded by calling them, so
// the frame's bytes go through unchanged, without a schema and without
// being parsed.
type protoFrame Frame

// Reset empties the frame; the protobuf runtime resets a message before it
// decodes into it.
func (p *protoFrame) Reset() { (*Frame)(p).free() }

func (p *protoFrame) String() string { return fmt.Sprintf("proxy.Frame(%d bytes)", p.data.Len()) }

// ProtoMessage marks the type as a v1 protobuf message.
func (*protoFrame) ProtoMessage() {}

// Marshal returns the frame's bytes; the runtime copies them into its own
// buffer, so they need no copy here.
func (p *protoFrame) Marshal() ([]byte, error) { return (*Frame)(p).view(), nil }

// Unmarshal keeps a copy of b: gRPC reuses b's buffer once decoding
// returns.
func (p *protoFrame) Unmarshal(b []byte) error {
	(*Frame)(p).free()
	p.data = mem.BufferSlice{mem.SliceBuffer(bytes.Clone(b))}
	return nil
}

// asFrame is v as a Frame, if it is one: a *Frame, or a *protoFrame from a
// frameStream on a server that uses Codec.
func asFrame(v any) (*Frame, bool) {
	switch f := v.(type) {
	case *Frame:
		return f, true
	case *protoFrame:
		return (*Frame)(f), true
	}
	return nil, false
}
