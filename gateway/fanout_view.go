package gateway

import (
	"context"
	"errors"
	"io"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/proxy/proxypb"
)

// A call that names several agents fans out, and its caller gets one
// labelled message per agent (see package proxy) where the agents' method
// may return one. A reflection-driven client (grpcurl, a gRPC UI) must be
// told so, or it calls a unary method as unary and fails on the second
// message. So with several agents named, the gateway does not fan
// reflection out: it asks one of the named agents and rewrites what it
// answers into the fan-out view of its services: every method returns a
// stream, and every message has the label field, whose own file (the
// Label message and what it imports) the gateway serves itself. Health is
// not fanned out either: the gateway's own answers.

// Reflection's methods, v1 and the older v1alpha that some clients still
// try first; their messages are the same on the wire.
const (
	reflectionV1      = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	reflectionV1alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
	healthPrefix      = "/grpc.health.v1.Health/"
)

// labelFieldName names the label field in the fan-out view. It is longer
// than the package doc's "label" so that it does not clash with a field
// the agents' messages already have.
const labelFieldName = "grpctunnel_label"

// fanOutLocally answers, for a call that names several agents, what must
// not fan out: health (the gateway's own) and reflection (the fan-out view
// of one agent's). It reports false for every other call, which fans out.
func (g *Gateway) fanOutLocally(ss grpc.ServerStream, method string, keys []string) (bool, error) {
	switch {
	case strings.HasPrefix(method, healthPrefix):
		if h := g.local.lookup(method); h != nil {
			return true, h(ss)
		}
	case method == reflectionV1 || method == reflectionV1alpha:
		return true, g.reflectFanOut(ss, method, keys)
	}
	return false, nil
}

// reflectFanOut serves a reflection stream for a call naming keys: each
// request for the Label's files is answered here, every other goes to the
// first named agent that is connected, and its answer comes back as the
// fan-out view. Requests are answered one at a time, in order, as the
// reflection protocol wants.
func (g *Gateway) reflectFanOut(ss grpc.ServerStream, method string, keys []string) error {
	ctx := ss.Context()
	conn, key, err := g.reflectionConn(ctx, keys)
	if err != nil {
		return err
	}
	upstream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method)
	if err != nil {
		return err
	}
	for {
		req := new(reflectionpb.ServerReflectionRequest)
		if err := ss.RecvMsg(req); err != nil {
			if errors.Is(err, io.EOF) {
				_ = upstream.CloseSend()
				return nil
			}
			return err
		}
		resp, ok := labelFiles(req)
		if !ok {
			if err := upstream.SendMsg(req); err != nil {
				return upstreamFailure(key, upstream, err)
			}
			resp = new(reflectionpb.ServerReflectionResponse)
			if err := upstream.RecvMsg(resp); err != nil {
				return upstreamFailure(key, upstream, err)
			}
			if fds := resp.GetFileDescriptorResponse(); fds != nil {
				for i, b := range fds.GetFileDescriptorProto() {
					if view, err := fanOutView(b); err == nil {
						fds.FileDescriptorProto[i] = view
					}
				}
			}
		}
		if err := ss.SendMsg(resp); err != nil {
			return err
		}
	}
}

// upstreamFailure is the status of a reflection stream whose agent
// failed: the agent's own, when it ended the stream.
func upstreamFailure(key string, upstream grpc.ClientStream, err error) error {
	if errors.Is(err, io.EOF) {
		// A failed send: the stream's status is what RecvMsg returns.
		err = upstream.RecvMsg(new(reflectionpb.ServerReflectionResponse))
		if err == nil || errors.Is(err, io.EOF) {
			return status.Errorf(codes.Unavailable, "grpctunnel gateway: agent %s ended its reflection stream", errtext.Quote(key))
		}
	}
	return err
}

// reflectionConn is the connection to the first of keys whose agent is
// connected here or to another replica, with the call's metadata for it.
func (g *Gateway) reflectionConn(ctx context.Context, keys []string) (grpc.ClientConnInterface, string, error) {
	for _, key := range keys {
		if g.agents.has(key) {
			return withMetadata{g.Agent(key), g.outgoing(ctx)}, key, nil
		}
		if b, ok := g.viaPeers(ctx, key); ok {
			return withMetadata{b.Conn, g.outgoing(ctx)}, key, nil
		}
	}
	return nil, "", status.Errorf(codes.Unavailable, "grpctunnel gateway: none of the agents named is connected (%s), so none can describe their services", errtext.Quote(strings.Join(keys, ",")))
}

// withMetadata makes its calls with md as their outgoing metadata.
type withMetadata struct {
	grpc.ClientConnInterface
	md metadata.MD
}

func (c withMetadata) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return c.ClientConnInterface.NewStream(metadata.NewOutgoingContext(ctx, c.md), desc, method, opts...)
}

// labelFiles answers a request for the files of the Label message (its
// own and those it imports), which the fan-out view imports and no agent
// has: from the gateway's own registry.
func labelFiles(req *reflectionpb.ServerReflectionRequest) (*reflectionpb.ServerReflectionResponse, bool) {
	var fd protoreflect.FileDescriptor
	switch {
	case req.GetFileByFilename() != "":
		fd = labelFile(req.GetFileByFilename())
	case req.GetFileContainingSymbol() != "":
		if d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(req.GetFileContainingSymbol())); err == nil {
			fd = labelFile(d.ParentFile().Path())
		}
	}
	if fd == nil {
		return nil, false
	}
	b, err := proto.Marshal(protodesc.ToFileDescriptorProto(fd))
	if err != nil {
		return nil, false
	}
	return &reflectionpb.ServerReflectionResponse{
		ValidHost:       req.GetHost(),
		OriginalRequest: req,
		MessageResponse: &reflectionpb.ServerReflectionResponse_FileDescriptorResponse{
			FileDescriptorResponse: &reflectionpb.FileDescriptorResponse{FileDescriptorProto: [][]byte{b}},
		},
	}, true
}

// labelFile returns the file at path if it is the Label's or one it
// imports, directly or not.
func labelFile(path string) protoreflect.FileDescriptor {
	var found protoreflect.FileDescriptor
	var walk func(fd protoreflect.FileDescriptor)
	walk = func(fd protoreflect.FileDescriptor) {
		if found != nil {
			return
		}
		if fd.Path() == path {
			found = fd
			return
		}
		imports := fd.Imports()
		for i := range imports.Len() {
			walk(imports.Get(i).FileDescriptor)
		}
	}
	walk(labelDescriptor().ParentFile())
	return found
}

// labelDescriptor is the Label message's descriptor.
func labelDescriptor() protoreflect.MessageDescriptor {
	return (&proxypb.Label{}).ProtoReflect().Descriptor()
}

// fanOutView rewrites one serialized file of an agent's services into its
// fan-out view: every method of its services returns a stream, and every
// message (nested ones too; not map entries) has the label field, unless
// it has a field of that number or name already. Reflection's and health's
// own files are left as they are, since those are never fanned out.
func fanOutView(b []byte) ([]byte, error) {
	fd := new(descriptorpb.FileDescriptorProto)
	if err := proto.Unmarshal(b, fd); err != nil {
		return nil, err
	}
	pkg := fd.GetPackage()
	if strings.HasPrefix(pkg, "grpc.reflection.") || pkg == "grpc.health.v1" {
		return b, nil
	}
	for _, svc := range fd.GetService() {
		for _, m := range svc.GetMethod() {
			m.ServerStreaming = proto.Bool(true)
		}
	}
	label := labelDescriptor()
	labelled := false
	var addLabel func(msgs []*descriptorpb.DescriptorProto)
	addLabel = func(msgs []*descriptorpb.DescriptorProto) {
		for _, m := range msgs {
			addLabel(m.GetNestedType())
			if m.GetOptions().GetMapEntry() || hasField(m, proxy.DefaultLabelField, labelFieldName) {
				continue
			}
			m.Field = append(m.Field, &descriptorpb.FieldDescriptorProto{
				Name:     proto.String(labelFieldName),
				Number:   proto.Int32(int32(proxy.DefaultLabelField)),
				Label:    descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
				Type:     descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum(),
				TypeName: proto.String("." + string(label.FullName())),
				JsonName: proto.String("grpctunnelLabel"),
			})
			labelled = true
		}
	}
	addLabel(fd.GetMessageType())
	if labelled && fd.GetName() != label.ParentFile().Path() {
		fd.Dependency = append(fd.Dependency, label.ParentFile().Path())
	}
	return proto.Marshal(fd)
}

// hasField reports whether m has a field numbered number or named name.
func hasField(m *descriptorpb.DescriptorProto, number protowire.Number, name string) bool {
	for _, f := range m.GetField() {
		if f.GetNumber() == int32(number) || f.GetName() == name {
			return true
		}
	}
	return false
}
