package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// A Talos-shaped service, built at run time so that the tests need no
// generated code:
//
//	package proxytest.talos;
//	message Metadata { string hostname = 1; string error = 2; google.rpc.Status status = 3; }
//	message Reply { Metadata metadata = 1; string text = 2; }
//	message Response { repeated Reply messages = 1; }
//	service Node {
//	  rpc Version(google.protobuf.StringValue) returns (Response);
//	  rpc Logs(google.protobuf.StringValue) returns (stream Reply);
//	}
const (
	talosVersion = "/proxytest.talos.Node/Version"
	talosLogs    = "/proxytest.talos.Node/Logs"
)

// talosTypes are the service's message types.
type talosTypes struct {
	metadata, reply, response protoreflect.MessageDescriptor
}

// talos registers the service's file in protoregistry.GlobalFiles, as
// generated code would, once, and returns its types.
var talos = sync.OnceValue(func() talosTypes {
	field := func(name string, n int32, typ descriptorpb.FieldDescriptorProto_Type, typeName string, repeated bool) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{
			Name:     proto.String(name),
			JsonName: proto.String(name),
			Number:   proto.Int32(n),
			Label:    descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
			Type:     typ.Enum(),
		}
		if typeName != "" {
			f.TypeName = proto.String(typeName)
		}
		if repeated {
			f.Label = descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
		}
		return f
	}
	const (
		str = descriptorpb.FieldDescriptorProto_TYPE_STRING
		msg = descriptorpb.FieldDescriptorProto_TYPE_MESSAGE
	)
	fd, err := protodesc.NewFile(&descriptorpb.FileDescriptorProto{
		Name:       proto.String("proxytest/talos.proto"),
		Package:    proto.String("proxytest.talos"),
		Syntax:     proto.String("proto3"),
		Dependency: []string{"google/rpc/status.proto", "google/protobuf/wrappers.proto"},
		MessageType: []*descriptorpb.DescriptorProto{
			{Name: proto.String("Metadata"), Field: []*descriptorpb.FieldDescriptorProto{
				field("hostname", 1, str, "", false),
				field("error", 2, str, "", false),
				field("status", 3, msg, ".google.rpc.Status", false),
			}},
			{Name: proto.String("Reply"), Field: []*descriptorpb.FieldDescriptorProto{
				field("metadata", 1, msg, ".proxytest.talos.Metadata", false),
				field("text", 2, str, "", false),
			}},
			{Name: proto.String("Response"), Field: []*descriptorpb.FieldDescriptorProto{
				field("messages", 1, msg, ".proxytest.talos.Reply", true),
			}},
		},
		Service: []*descriptorpb.ServiceDescriptorProto{{
			Name: proto.String("Node"),
			Method: []*descriptorpb.MethodDescriptorProto{
				{Name: proto.String("Version"), InputType: proto.String(".google.protobuf.StringValue"), OutputType: proto.String(".proxytest.talos.Response")},
				{Name: proto.String("Logs"), InputType: proto.String(".google.protobuf.StringValue"), OutputType: proto.String(".proxytest.talos.Reply"), ServerStreaming: proto.Bool(true)},
			},
		}},
	}, protoregistry.GlobalFiles)
	if err != nil {
		panic(err)
	}
	if err := protoregistry.GlobalFiles.RegisterFile(fd); err != nil {
		panic(err)
	}
	return talosTypes{
		metadata: fd.Messages().ByName("Metadata"),
		reply:    fd.Messages().ByName("Reply"),
		response: fd.Messages().ByName("Response"),
	}
})

// isUnary reports whether method, "/package.Service/Method", is a
// unary method of a service in protoregistry.GlobalFiles: what
// siderolabs/grpc-proxy's WithStreamedDetector tells, and what Route.Unary
// wants.
func isUnary(method string) bool {
	name := protoreflect.FullName(strings.ReplaceAll(strings.TrimPrefix(method, "/"), "/", "."))
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(name)
	if err != nil {
		return false
	}
	m, ok := d.(protoreflect.MethodDescriptor)
	return ok && !m.IsStreamingClient() && !m.IsStreamingServer()
}

// talosReply builds a Reply with text and, if hostname is not empty, a
// metadata naming it, as a node that reports its own name would.
func talosReply(hostname, text string) *dynamicpb.Message {
	ty := talos()
	r := dynamicpb.NewMessage(ty.reply)
	r.Set(ty.reply.Fields().ByName("text"), protoreflect.ValueOfString(text))
	if hostname != "" {
		md := dynamicpb.NewMessage(ty.metadata)
		md.Set(ty.metadata.Fields().ByName("hostname"), protoreflect.ValueOfString(hostname))
		r.Set(ty.reply.Fields().ByName("metadata"), protoreflect.ValueOfMessage(md))
	}
	return r
}

// talosNode serves the Talos-shaped service, as talosService does.
func talosNode(t *testing.T, name string, fail *status.Status) *grpc.ClientConn {
	t.Helper()
	return serve(t, nil, grpc.UnknownServiceHandler(talosService(name, fail)))
}

// talosService is the Talos-shaped service: Version answers "<name>
// <request>" in one reply, Logs streams "<name> line 1" and "<name> line 2".
// Every reply carries a metadata with hostname "self", which the proxy's
// must replace. With fail set, both methods fail with it instead.
func talosService(name string, fail *status.Status) grpc.StreamHandler {
	ty := talos()
	return func(_ any, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		req := new(wrapperspb.StringValue)
		if err := ss.RecvMsg(req); err != nil {
			return err
		}
		if fail != nil {
			return fail.Err()
		}
		switch method {
		case talosVersion:
			resp := dynamicpb.NewMessage(ty.response)
			list := resp.Mutable(ty.response.Fields().ByName("messages")).List()
			list.Append(protoreflect.ValueOfMessage(talosReply("self", name+" "+req.GetValue())))
			return ss.SendMsg(resp)
		case talosLogs:
			for i := 1; i <= 2; i++ {
				if err := ss.SendMsg(talosReply("self", fmt.Sprintf("%s line %d", name, i))); err != nil {
					return err
				}
			}
			return nil
		}
		return status.Error(codes.Unimplemented, method)
	}
}

// talosResult is one reply as a client reads it: the node's name, and its
// text or error.
type talosResult struct {
	hostname, text, error string
	code                  codes.Code
}

func (r talosResult) String() string {
	if r.error != "" {
		return fmt.Sprintf("%s: %s (%s)", r.hostname, r.error, r.code)
	}
	return fmt.Sprintf("%s: %s", r.hostname, r.text)
}

// readReply reads a Reply as a Talos client does.
func readReply(r protoreflect.Message) talosResult {
	ty := talos()
	md := r.Get(ty.reply.Fields().ByName("metadata")).Message()
	res := talosResult{
		hostname: md.Get(ty.metadata.Fields().ByName("hostname")).String(),
		text:     r.Get(ty.reply.Fields().ByName("text")).String(),
		error:    md.Get(ty.metadata.Fields().ByName("error")).String(),
	}
	if f := ty.metadata.Fields().ByName("status"); md.Has(f) {
		b, err := proto.Marshal(md.Get(f).Message().Interface())
		if err != nil {
			panic(err)
		}
		st := new(spb.Status)
		if err := proto.Unmarshal(b, st); err != nil {
			panic(err)
		}
		res.code = codes.Code(st.GetCode())
	}
	return res
}

// readResponse reads a unary Response's replies.
func readResponse(resp *dynamicpb.Message) []talosResult {
	list := resp.Get(talos().response.Fields().ByName("messages")).List()
	var out []talosResult
	for i := range list.Len() {
		out = append(out, readReply(list.Get(i).Message()))
	}
	return out
}

// talosDirector fans every call out to backends, Talos's way: with the
// Talos responder and the method's kind from its descriptor.
func talosDirector(backends ...proxy.Backend) proxy.Director {
	return func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.Route{
			Backends:  backends,
			Metadata:  md.Copy(),
			FanOut:    true,
			Unary:     isUnary(call.Method()),
			Responder: proxy.TalosResponder(),
		}, nil
	}
}

// checkTrailer checks the fan-out trailers.
func checkTrailer(t *testing.T, tr metadata.MD, backends, failed string) {
	t.Helper()
	if got := tr.Get(proxy.FanOutBackendsTrailer); !slices.Equal(got, []string{backends}) {
		t.Errorf("trailer %s = %q; want %q", proxy.FanOutBackendsTrailer, got, backends)
	}
	if got := tr.Get(proxy.FanOutFailedTrailer); !slices.Equal(got, []string{failed}) {
		t.Errorf("trailer %s = %q; want %q", proxy.FanOutFailedTrailer, got, failed)
	}
}

func TestTalosUnaryMerged(t *testing.T) {
	a := talosNode(t, "a", nil)
	b := talosNode(t, "b", status.New(codes.FailedPrecondition, "disk full"))
	front := serve(t, nil, proxy.ServerOptions(talosDirector(
		proxy.Backend{Name: "node-a", Conn: a},
		proxy.Backend{Name: "node-b", Conn: b},
		proxy.Backend{Name: "node-c", Conn: nil},
	))...)

	// A plain unary client: one request, one response.
	resp := dynamicpb.NewMessage(talos().response)
	var tr metadata.MD
	err := front.Invoke(context.Background(), talosVersion, wrapperspb.String("hi"), resp, grpc.Trailer(&tr))
	if err != nil {
		t.Fatalf("Version: %v", err)
	}
	got := readResponse(resp)
	want := []talosResult{
		{hostname: "node-a", text: "a hi"},
		{hostname: "node-b", error: status.Error(codes.FailedPrecondition, "disk full").Error(), code: codes.FailedPrecondition},
		{hostname: "node-c", error: status.Error(codes.Unavailable, `proxy: no connection for backend "node-c"`).Error(), code: codes.Unavailable},
	}
	if !slices.Equal(got, want) {
		t.Errorf("replies %v; want %v (in the route's order)", got, want)
	}
	checkTrailer(t, tr, "3", "2")
}

func TestTalosStreaming(t *testing.T) {
	a := talosNode(t, "a", nil)
	b := talosNode(t, "b", status.New(codes.Unavailable, "rebooting"))
	front := serve(t, nil, proxy.ServerOptions(talosDirector(
		proxy.Backend{Name: "node-a", Conn: a},
		proxy.Backend{Name: "node-b", Conn: b},
	))...)

	cs, err := front.NewStream(context.Background(), &grpc.StreamDesc{ServerStreams: true}, talosLogs)
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.SendMsg(wrapperspb.String("")); err != nil {
		t.Fatal(err)
	}
	if err := cs.CloseSend(); err != nil {
		t.Fatal(err)
	}
	byNode := map[string][]talosResult{}
	for {
		r := dynamicpb.NewMessage(talos().reply)
		if err := cs.RecvMsg(r); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("Logs ended with %v; want OK", err)
			}
			break
		}
		res := readReply(r)
		byNode[res.hostname] = append(byNode[res.hostname], res)
	}
	if got, want := byNode["node-a"], []talosResult{
		{hostname: "node-a", text: "a line 1"},
		{hostname: "node-a", text: "a line 2"},
	}; !slices.Equal(got, want) {
		t.Errorf("node-a's replies %v; want %v", got, want)
	}
	if got, want := byNode["node-b"], []talosResult{
		{hostname: "node-b", error: status.Error(codes.Unavailable, "rebooting").Error(), code: codes.Unavailable},
	}; !slices.Equal(got, want) {
		t.Errorf("node-b's replies %v; want %v", got, want)
	}
	if len(byNode) != 2 {
		t.Errorf("replies from %d hostnames; want 2", len(byNode))
	}
	checkTrailer(t, cs.Trailer(), "2", "1")
}

func TestTalosOneBackend(t *testing.T) {
	a := talosNode(t, "a", nil)

	t.Run("FanOut", func(t *testing.T) {
		front := serve(t, nil, proxy.ServerOptions(talosDirector(proxy.Backend{Name: "node-a", Conn: a}))...)
		resp := dynamicpb.NewMessage(talos().response)
		var tr metadata.MD
		if err := front.Invoke(context.Background(), talosVersion, wrapperspb.String("hi"), resp, grpc.Trailer(&tr)); err != nil {
			t.Fatal(err)
		}
		if got, want := readResponse(resp), []talosResult{{hostname: "node-a", text: "a hi"}}; !slices.Equal(got, want) {
			t.Errorf("replies %v; want %v: the shape of a fan-out", got, want)
		}
		checkTrailer(t, tr, "1", "0")
	})

	t.Run("failing", func(t *testing.T) {
		b := talosNode(t, "b", status.New(codes.Internal, "boom"))
		front := serve(t, nil, proxy.ServerOptions(talosDirector(proxy.Backend{Name: "node-b", Conn: b}))...)
		resp := dynamicpb.NewMessage(talos().response)
		var tr metadata.MD
		if err := front.Invoke(context.Background(), talosVersion, wrapperspb.String("hi"), resp, grpc.Trailer(&tr)); err != nil {
			t.Fatalf("Version ended with %v; want OK, the failure in the reply", err)
		}
		want := []talosResult{{hostname: "node-b", error: status.Error(codes.Internal, "boom").Error(), code: codes.Internal}}
		if got := readResponse(resp); !slices.Equal(got, want) {
			t.Errorf("replies %v; want %v", got, want)
		}
		checkTrailer(t, tr, "1", "1")
	})

	t.Run("transparent without FanOut", func(t *testing.T) {
		director := func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			return proxy.Route{Backends: []proxy.Backend{{Name: "node-a", Conn: a}}, Metadata: md.Copy(), Unary: true, Responder: proxy.TalosResponder()}, nil
		}
		front := serve(t, nil, proxy.ServerOptions(director)...)
		resp := dynamicpb.NewMessage(talos().response)
		var tr metadata.MD
		if err := front.Invoke(context.Background(), talosVersion, wrapperspb.String("hi"), resp, grpc.Trailer(&tr)); err != nil {
			t.Fatal(err)
		}
		if got, want := readResponse(resp), []talosResult{{hostname: "self", text: "a hi"}}; !slices.Equal(got, want) {
			t.Errorf("replies %v; want the backend's own %v", got, want)
		}
		if got := tr.Get(proxy.FanOutBackendsTrailer); got != nil {
			t.Errorf("trailer %s = %q on a forwarded call", proxy.FanOutBackendsTrailer, got)
		}
	})
}

func TestTalosResponderMalformed(t *testing.T) {
	r := proxy.TalosResponder()
	for _, msg := range [][]byte{
		{0x08, 0x01},       // field 1 a varint: not a repeated message
		{0x0a, 0x05, 0x01}, // field 1 shorter than its length
		{0xff},             // a truncated tag
	} {
		if out, err := r.Message(proxy.Backend{Name: "n"}, true, msg); err == nil {
			t.Errorf("Message(%x) = %x; want an error", msg, out)
		}
	}
	// Fields other than the replies stay, and an empty response stays
	// empty: it has no reply to name the node in.
	got, err := r.Message(proxy.Backend{Name: "n"}, true, []byte{0x10, 0x07})
	if err != nil || string(got) != "\x10\x07" {
		t.Errorf("Message(field 2) = %x, %v; want it unchanged", got, err)
	}
}
