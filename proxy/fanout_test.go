package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/proxy/proxypb"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

const (
	unaryMethod        = "/grpchantesting.TestService/Unary"
	clientStreamMethod = "/grpchantesting.TestService/ClientStream"
	serverStreamMethod = "/grpchantesting.TestService/ServerStream"
	bidiMethod         = "/grpchantesting.TestService/BidiStream"
)

// recorder is a TestService backend that remembers the payload of every
// request it receives. With fail set, it fails every call with that status
// once it has read the requests; with stopAfter set, a client-streaming
// call ends successfully after that many requests. A server-streaming call
// with a negative count blocks until the call is cancelled, reporting on
// entered and cancelled.
type recorder struct {
	grpchantesting.TestServer
	fail      *status.Status
	stopAfter int

	entered   chan struct{}
	cancelled chan struct{}

	mu  sync.Mutex
	got []string
}

func newRecorder() *recorder {
	return &recorder{entered: make(chan struct{}, 16), cancelled: make(chan struct{}, 16)}
}

func (r *recorder) record(m *grpchantesting.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, string(m.GetPayload()))
}

// payloads returns the payloads received so far, in order.
func (r *recorder) payloads() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

func (r *recorder) Unary(ctx context.Context, req *grpchantesting.Message) (*grpchantesting.Message, error) {
	r.record(req)
	if r.fail != nil {
		return nil, r.fail.Err()
	}
	return r.TestServer.Unary(ctx, req)
}

func (r *recorder) ClientStream(s grpchantesting.TestService_ClientStreamServer) error {
	var n int32
	var last []byte
	for r.stopAfter == 0 || int(n) < r.stopAfter {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		r.record(m)
		n++
		last = m.GetPayload()
	}
	if r.fail != nil {
		return r.fail.Err()
	}
	return s.SendAndClose(&grpchantesting.Message{Payload: last, Count: n})
}

func (r *recorder) ServerStream(req *grpchantesting.Message, ss grpchantesting.TestService_ServerStreamServer) error {
	r.record(req)
	if req.GetCount() < 0 {
		r.entered <- struct{}{}
		<-ss.Context().Done()
		r.cancelled <- struct{}{}
		return status.FromContextError(ss.Context().Err()).Err()
	}
	if r.fail != nil {
		return r.fail.Err()
	}
	return r.TestServer.ServerStream(req, ss)
}

// BidiStream echoes every request at once.
func (r *recorder) BidiStream(s grpchantesting.TestService_BidiStreamServer) error {
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			if r.fail != nil {
				return r.fail.Err()
			}
			return nil
		}
		if err != nil {
			return err
		}
		r.record(m)
		if err := s.Send(&grpchantesting.Message{Payload: m.GetPayload()}); err != nil {
			return err
		}
	}
}

// forwardBackend serves srv behind a forward tunnel and returns the tunnel.
func forwardBackend(t *testing.T, srv grpchantesting.TestServiceServer) grpc.ClientConnInterface {
	t.Helper()
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
	grpchantesting.RegisterTestServiceServer(handler, srv)
	conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
	ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ch.Close() })
	return ch
}

// reverseBackend serves srv in a reverse tunnel server that dials a tunnel
// handler, and returns the handler's channel to it.
func reverseBackend(t *testing.T, srv grpchantesting.TestServiceServer) grpc.ClientConnInterface {
	t.Helper()
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
	conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	grpchantesting.RegisterTestServiceServer(rs, srv)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_, _ = rs.Serve(context.Background())
	}()
	t.Cleanup(func() {
		rs.Stop()
		<-served
	})
	if err := handler.AsChannel().WaitForReady(context.Background()); err != nil {
		t.Fatal(err)
	}
	return handler.AsChannel()
}

// threeKinds serves the three servers behind an ordinary gRPC connection, a
// forward tunnel and a reverse tunnel, as backends "grpc", "forward" and
// "reverse".
func threeKinds(t *testing.T, grpcSrv, fwdSrv, revSrv grpchantesting.TestServiceServer) []proxy.Backend {
	t.Helper()
	return []proxy.Backend{
		{Name: "grpc", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, grpcSrv) })},
		{Name: "forward", Conn: forwardBackend(t, fwdSrv)},
		{Name: "reverse", Conn: reverseBackend(t, revSrv)},
	}
}

// fanTo fans every call out to backends with the incoming metadata.
func fanTo(backends ...proxy.Backend) proxy.Director {
	return func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.Route{Backends: backends, Metadata: md.Copy()}, nil
	}
}

// rawCodec is what a client without the schema uses: *[]byte passes
// through as the message's bytes; proto messages are marshalled as usual.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(*[]byte); ok {
		return mem.BufferSlice{mem.SliceBuffer(*b)}, nil
	}
	b, err := proto.Marshal(v.(proto.Message))
	return mem.BufferSlice{mem.SliceBuffer(b)}, err
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if b, ok := v.(*[]byte); ok {
		*b = data.Materialize()
		return nil
	}
	return proto.Unmarshal(data.Materialize(), v.(proto.Message))
}

func (rawCodec) Name() string { return "proto" }

// result is one message of a fanned-out call, as a client reads it.
type result struct {
	raw   []byte
	msg   *grpchantesting.Message // the payload, decoded
	label *proxypb.Label
}

// fanCall calls method on conn as a server-streaming call, sends reqs,
// half-closes, and returns the results in arrival order and the call's
// status. Every result must carry a label under field; it is checked
// against a "fan-out view" decoding of the same bytes.
func fanCall(ctx context.Context, t *testing.T, conn grpc.ClientConnInterface, method string, field protowire.Number, reqs ...proto.Message) ([]result, error) {
	t.Helper()
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	cs, err := conn.NewStream(ctx, desc, method, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		return nil, err
	}
	for _, req := range reqs {
		if err := cs.SendMsg(req); err != nil {
			break // the status comes from RecvMsg
		}
	}
	_ = cs.CloseSend()
	view := viewType(t, field)
	var results []result
	for {
		var raw []byte
		if err := cs.RecvMsg(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return results, nil
			}
			return results, err
		}
		payload, label, err := proxy.SplitLabel(raw, field)
		if err != nil || label == nil {
			t.Fatalf("SplitLabel(%x) = label %v, %v; want a label", raw, label, err)
		}
		msg := new(grpchantesting.Message)
		if err := proto.Unmarshal(payload, msg); err != nil {
			t.Fatalf("payload %x: %v", payload, err)
		}
		checkView(t, view, raw, msg, label)
		results = append(results, result{raw: raw, msg: msg, label: label})
	}
}

// viewType builds, at run time, the "fan-out view" of
// grpchantesting.Message a client would declare in its own .proto: the same
// fields plus `grpctunnel.proxy.v1.Label label = field;`.
func viewType(t *testing.T, field protowire.Number) protoreflect.MessageType {
	t.Helper()
	md := (&grpchantesting.Message{}).ProtoReflect().Descriptor()
	dp := protodesc.ToDescriptorProto(md)
	orig := "." + string(md.FullName())
	dp.Name = proto.String(string(md.Name()) + "View")
	for _, f := range dp.Field {
		// Map entries are nested types: point at the view's own.
		if rest, ok := strings.CutPrefix(f.GetTypeName(), orig+"."); ok {
			f.TypeName = proto.String(orig + "View." + rest)
		}
	}
	dp.Field = append(dp.Field, &descriptorpb.FieldDescriptorProto{
		Name:     proto.String("label"),
		JsonName: proto.String("label"),
		Number:   proto.Int32(int32(field)),
		Label:    descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
		Type:     descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum(),
		TypeName: proto.String(".grpctunnel.proxy.v1.Label"),
	})
	file := md.ParentFile()
	deps := []string{proxypb.File_grpctunnel_proxy_v1_label_proto.Path()}
	for i := range file.Imports().Len() {
		deps = append(deps, file.Imports().Get(i).Path())
	}
	fd, err := protodesc.NewFile(&descriptorpb.FileDescriptorProto{
		Name:        proto.String("proxy_test/fanout_view.proto"),
		Package:     proto.String(string(file.Package())),
		Syntax:      proto.String("proto3"),
		Dependency:  deps,
		MessageType: []*descriptorpb.DescriptorProto{dp},
	}, protoregistry.GlobalFiles)
	if err != nil {
		t.Fatal(err)
	}
	return dynamicpb.NewMessageType(fd.Messages().Get(0))
}

// checkView decodes raw with the fan-out view and checks that it agrees
// with what SplitLabel made of it.
func checkView(t *testing.T, view protoreflect.MessageType, raw []byte, msg *grpchantesting.Message, label *proxypb.Label) {
	t.Helper()
	v := view.New()
	if err := proto.Unmarshal(raw, v.Interface()); err != nil {
		t.Fatalf("decoding %x with the fan-out view: %v", raw, err)
	}
	fields := v.Descriptor().Fields()
	if got := v.Get(fields.ByName("payload")).Bytes(); string(got) != string(msg.GetPayload()) {
		t.Errorf("view payload %q; SplitLabel's %q", got, msg.GetPayload())
	}
	if got := v.Get(fields.ByName("count")).Int(); got != int64(msg.GetCount()) {
		t.Errorf("view count %d; SplitLabel's %d", got, msg.GetCount())
	}
	lb, err := proto.Marshal(v.Get(fields.ByName("label")).Message().Interface())
	if err != nil {
		t.Fatal(err)
	}
	viewLabel := new(proxypb.Label)
	if err := proto.Unmarshal(lb, viewLabel); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(viewLabel, label) {
		t.Errorf("view label %v; SplitLabel's %v", viewLabel, label)
	}
}

// byBackend groups results' payloads by backend name, in arrival order.
func byBackend(results []result) map[string][]string {
	m := map[string][]string{}
	for _, r := range results {
		m[r.label.GetBackend()] = append(m[r.label.GetBackend()], string(r.msg.GetPayload()))
	}
	return m
}

func msg(payload string) *grpchantesting.Message {
	return &grpchantesting.Message{Payload: []byte(payload)}
}

// await waits for ch to yield; the bound only turns a hang into a failure.
func await(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func TestFanOutThreeKinds(t *testing.T) {
	recs := []*recorder{newRecorder(), newRecorder(), newRecorder()}
	front := serve(t, nil, proxy.ServerOptions(fanTo(threeKinds(t, recs[0], recs[1], recs[2])...))...)
	names := []string{"forward", "grpc", "reverse"}
	ctx := context.Background()

	t.Run("unary", func(t *testing.T) {
		results, err := fanCall(ctx, t, front, unaryMethod, proxy.DefaultLabelField, msg("hello"))
		if err != nil {
			t.Fatalf("call ended with %v; want OK", err)
		}
		got := byBackend(results)
		for _, name := range names {
			if p := got[name]; len(p) != 1 || p[0] != "hello" {
				t.Errorf("backend %s: payloads %q; want [hello]", name, p)
			}
		}
		if len(results) != 3 {
			t.Errorf("%d results; want 3", len(results))
		}
		for _, r := range results {
			if r.label.GetStatus() != nil {
				t.Errorf("result of %s has status %v", r.label.GetBackend(), r.label.GetStatus())
			}
		}
	})
	t.Run("server stream", func(t *testing.T) {
		req := &grpchantesting.Message{Payload: []byte("again"), Count: 3}
		results, err := fanCall(ctx, t, front, serverStreamMethod, proxy.DefaultLabelField, req)
		if err != nil {
			t.Fatalf("call ended with %v; want OK", err)
		}
		got := byBackend(results)
		for _, name := range names {
			if p := got[name]; !slices.Equal(p, []string{"again", "again", "again"}) {
				t.Errorf("backend %s: payloads %q; want three", name, p)
			}
		}
	})
	t.Run("bidi", func(t *testing.T) {
		results, err := fanCall(ctx, t, front, bidiMethod, proxy.DefaultLabelField, msg("m0"), msg("m1"), msg("m2"))
		if err != nil {
			t.Fatalf("call ended with %v; want OK", err)
		}
		got := byBackend(results)
		for _, name := range names {
			if p := got[name]; !slices.Equal(p, []string{"m0", "m1", "m2"}) {
				t.Errorf("backend %s: echoes %q; want m0 m1 m2 in order", name, p)
			}
		}
	})
	t.Run("large messages", func(t *testing.T) {
		// Large enough for gRPC to pool their buffers, which the proxy
		// then shares between backends and extends with labels.
		var reqs []proto.Message
		var want []string
		for i := range 5 {
			p := strings.Repeat(fmt.Sprintf("%d-", i), 100_000)
			reqs = append(reqs, msg(p))
			want = append(want, p)
		}
		results, err := fanCall(ctx, t, front, bidiMethod, proxy.DefaultLabelField, reqs...)
		if err != nil {
			t.Fatalf("call ended with %v; want OK", err)
		}
		got := byBackend(results)
		for i, name := range names {
			if !slices.Equal(got[name], want) {
				t.Errorf("backend %s: echoes differ from the requests", name)
			}
			if !slices.Equal(recs[i].payloads()[len(recs[i].payloads())-5:], want) {
				t.Errorf("backend %d: requests arrived changed", i)
			}
		}
	})
}

func TestFanOutRequestsReachEveryBackend(t *testing.T) {
	recs := []*recorder{newRecorder(), newRecorder(), newRecorder()}
	front := serve(t, nil, proxy.ServerOptions(fanTo(threeKinds(t, recs[0], recs[1], recs[2])...))...)
	// More messages than the proxy queues for a backend.
	var reqs []proto.Message
	var want []string
	for i := range 40 {
		reqs = append(reqs, msg(fmt.Sprintf("m%d", i)))
		want = append(want, fmt.Sprintf("m%d", i))
	}
	results, err := fanCall(context.Background(), t, front, clientStreamMethod, proxy.DefaultLabelField, reqs...)
	if err != nil {
		t.Fatalf("call ended with %v; want OK", err)
	}
	if len(results) != 3 {
		t.Fatalf("%d results; want 3", len(results))
	}
	for _, r := range results {
		if r.msg.GetCount() != 40 || string(r.msg.GetPayload()) != "m39" {
			t.Errorf("%s answered count %d, last %q; want 40, m39", r.label.GetBackend(), r.msg.GetCount(), r.msg.GetPayload())
		}
	}
	for i, r := range recs {
		if got := r.payloads(); !slices.Equal(got, want) {
			t.Errorf("backend %d received %q; want m0..m39 in order", i, got)
		}
	}
}

// TestFanOutEndedBackendHoldsUpNoOne: a backend that ends after one request
// stops taking requests, and the others still get them all.
func TestFanOutEndedBackendHoldsUpNoOne(t *testing.T) {
	quitter := newRecorder()
	quitter.stopAfter = 1
	stayers := []*recorder{newRecorder(), newRecorder()}
	backends := []proxy.Backend{
		{Name: "quitter", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, quitter) })},
		{Name: "stayer0", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, stayers[0]) })},
		{Name: "stayer1", Conn: forwardBackend(t, stayers[1])},
	}
	front := serve(t, nil, proxy.ServerOptions(fanTo(backends...))...)
	var reqs []proto.Message
	for i := range 100 {
		reqs = append(reqs, msg(fmt.Sprint(i)))
	}
	results, err := fanCall(context.Background(), t, front, clientStreamMethod, proxy.DefaultLabelField, reqs...)
	if err != nil {
		t.Fatalf("call ended with %v; want OK", err)
	}
	counts := map[string]int32{}
	for _, r := range results {
		counts[r.label.GetBackend()] = r.msg.GetCount()
	}
	if counts["quitter"] != 1 || counts["stayer0"] != 100 || counts["stayer1"] != 100 {
		t.Errorf("counts %v; want quitter 1, stayers 100", counts)
	}
	if got := len(quitter.payloads()); got != 1 {
		t.Errorf("the quitter received %d requests", got)
	}
}

func TestFanOutBackendFails(t *testing.T) {
	failing := newRecorder()
	st, err := status.New(codes.FailedPrecondition, "not today").WithDetails(wrapperspb.String("why"))
	if err != nil {
		t.Fatal(err)
	}
	failing.fail = st
	front := serve(t, nil, proxy.ServerOptions(fanTo(threeKinds(t, newRecorder(), newRecorder(), failing)...))...)

	for _, method := range []string{unaryMethod, clientStreamMethod} {
		t.Run(method, func(t *testing.T) {
			results, err := fanCall(context.Background(), t, front, method, proxy.DefaultLabelField, msg("x"))
			if err != nil {
				t.Fatalf("call ended with %v; want OK", err)
			}
			if len(results) != 3 {
				t.Fatalf("%d results; want 3", len(results))
			}
			for _, r := range results {
				name := r.label.GetBackend()
				if name != "reverse" {
					if r.label.GetStatus() != nil || string(r.msg.GetPayload()) != "x" {
						t.Errorf("%s: status %v, payload %q; want a plain answer", name, r.label.GetStatus(), r.msg.GetPayload())
					}
					continue
				}
				if len(r.raw) != len(labelOnly(t, name, st)) {
					t.Errorf("the failure result has %d bytes; want only the label", len(r.raw))
				}
				got := status.FromProto(r.label.GetStatus())
				if got.Code() != codes.FailedPrecondition || got.Message() != "not today" {
					t.Errorf("failure status %v", got)
				}
				details := got.Details()
				if len(details) != 1 || !proto.Equal(details[0].(proto.Message), wrapperspb.String("why")) {
					t.Errorf("failure details %v; want the backend's", details)
				}
			}
		})
	}
}

// labelOnly is the whole failure message the proxy sends for backend name
// failing with st.
func labelOnly(t *testing.T, name string, st *status.Status) []byte {
	t.Helper()
	body, err := proto.Marshal(&proxypb.Label{Backend: name, Status: st.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	b := protowire.AppendTag(nil, proxy.DefaultLabelField, protowire.BytesType)
	return protowire.AppendBytes(b, body)
}

func TestFanOutUnreachableBackends(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close() // nothing listens there any more
	refused, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer refused.Close()
	ok := newRecorder()
	backends := []proxy.Backend{
		{Name: "ok", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, ok) })},
		{Name: "nil", Conn: nil},
		{Name: "refused", Conn: refused},
		{Name: "timeout", Conn: errConn{context.DeadlineExceeded}},
		{Name: "broken", Conn: errConn{errors.New("broken")}},
	}
	front := serve(t, nil, proxy.ServerOptions(fanTo(backends...))...)
	results, err := fanCall(context.Background(), t, front, unaryMethod, proxy.DefaultLabelField, msg("x"))
	if err != nil {
		t.Fatalf("call ended with %v; want OK", err)
	}
	seen := map[string]codes.Code{}
	for _, r := range results {
		seen[r.label.GetBackend()] = status.FromProto(r.label.GetStatus()).Code()
	}
	want := map[string]codes.Code{
		"ok":      codes.OK,
		"nil":     codes.Unavailable,
		"refused": codes.Unavailable,
		"timeout": codes.DeadlineExceeded,
		"broken":  codes.Internal,
	}
	if len(results) != len(want) || !maps.Equal(seen, want) {
		t.Errorf("results %v; want %v", seen, want)
	}
}

// errConn is a connection whose calls fail to start with err.
type errConn struct{ err error }

func (c errConn) Invoke(context.Context, string, any, any, ...grpc.CallOption) error {
	return c.err
}

func (c errConn) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return nil, c.err
}

// TestFanOutClientGoesAway: when the client cancels or its deadline passes,
// every backend's call is cancelled (the backends see it) and the client
// gets its own status.
func TestFanOutClientGoesAway(t *testing.T) {
	recs := []*recorder{newRecorder(), newRecorder(), newRecorder()}
	front := serve(t, nil, proxy.ServerOptions(fanTo(threeKinds(t, recs[0], recs[1], recs[2])...))...)
	block := &grpchantesting.Message{Count: -1}

	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		errc := make(chan error, 1)
		go func() {
			_, err := fanCall(ctx, t, front, serverStreamMethod, proxy.DefaultLabelField, block)
			errc <- err
		}()
		for _, r := range recs {
			await(t, r.entered, "every backend to get the call")
		}
		cancel()
		for _, r := range recs {
			await(t, r.cancelled, "every backend's call to be cancelled")
		}
		if err := <-errc; status.Code(err) != codes.Canceled {
			t.Errorf("call ended with %v; want Canceled", err)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := fanCall(ctx, t, front, serverStreamMethod, proxy.DefaultLabelField, block)
		if status.Code(err) != codes.DeadlineExceeded {
			t.Errorf("call ended with %v; want DeadlineExceeded", err)
		}
		for _, r := range recs {
			await(t, r.entered, "every backend to get the call")
			await(t, r.cancelled, "every backend's call to end")
		}
	})
}

// TestFanOutHeadersFirst: a client that waits for response headers before
// it sends anything gets the proxy's own, even though every backend waits
// for a message first.
func TestFanOutHeadersFirst(t *testing.T) {
	front := serve(t, nil, proxy.ServerOptions(fanTo(threeKinds(t, newRecorder(), newRecorder(), newRecorder())...))...)
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	cs, err := front.NewStream(context.Background(), desc, bidiMethod, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Header(); err != nil {
		t.Fatalf("headers: %v", err)
	}
	if err := cs.SendMsg(msg("after headers")); err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for range 3 {
		var raw []byte
		if err := cs.RecvMsg(&raw); err != nil {
			t.Fatal(err)
		}
		_, label, err := proxy.SplitLabel(raw, proxy.DefaultLabelField)
		if err != nil {
			t.Fatal(err)
		}
		names[label.GetBackend()] = true
	}
	if len(names) != 3 {
		t.Errorf("echoes from %v; want three backends", names)
	}
	_ = cs.CloseSend()
	var raw []byte
	if err := cs.RecvMsg(&raw); !errors.Is(err, io.EOF) {
		t.Errorf("end of call: %v; want OK", err)
	}
}

// TestFanOutNamesAndLabelField: names are the director's (empty and
// repeated ones stay as they are), and WithLabelField moves the label.
func TestFanOutNamesAndLabelField(t *testing.T) {
	conn := serve(t, testService)
	backends := []proxy.Backend{{Name: "same", Conn: conn}, {Name: "same", Conn: conn}, {Conn: conn}}
	const field = 100
	front := serve(t, nil, proxy.ServerOptions(fanTo(backends...), proxy.WithLabelField(field))...)
	results, err := fanCall(context.Background(), t, front, unaryMethod, field, msg("x"))
	if err != nil {
		t.Fatalf("call ended with %v; want OK", err)
	}
	var names []string
	for _, r := range results {
		names = append(names, r.label.GetBackend())
		if _, label, err := proxy.SplitLabel(r.raw, proxy.DefaultLabelField); label != nil || err != nil {
			t.Errorf("a label under the default field too: %v, %v", label, err)
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"", "same", "same"}) {
		t.Errorf("names %q; want \"\", same, same", names)
	}
}

func TestWithLabelField(t *testing.T) {
	for _, n := range []protowire.Number{1, 18999, 20000, 100000, proxy.DefaultLabelField} {
		proxy.WithLabelField(n) // valid: no panic
	}
	for _, n := range []protowire.Number{0, -1, 19000, 19999, proxy.DefaultLabelField + 1} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("WithLabelField(%d) did not panic", n)
				}
			}()
			proxy.WithLabelField(n)
		}()
	}
}

// TestFanOutBehindTunnelServer: the fan-out handler installed in a reverse
// tunnel server (an agent fanning calls out to the services next to it)
// behaves as in a gRPC server, headers first included.
func TestFanOutBehindTunnelServer(t *testing.T) {
	recs := []*recorder{newRecorder(), newRecorder()}
	backends := []proxy.Backend{
		{Name: "one", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recs[0]) })},
		{Name: "two", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recs[1]) })},
	}
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
	conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
	agent := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn),
		tunnel.WithUnknownServiceHandler(proxy.Handler(fanTo(backends...))),
		tunnel.WithCodec(proxy.Codec()),
	)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_, _ = agent.Serve(context.Background())
	}()
	defer func() {
		agent.Stop()
		<-served
	}()
	ch := handler.AsChannel()
	if err := ch.WaitForReady(context.Background()); err != nil {
		t.Fatal(err)
	}

	results, err := fanCall(context.Background(), t, ch, bidiMethod, proxy.DefaultLabelField, msg("a"), msg("b"))
	if err != nil {
		t.Fatalf("call ended with %v; want OK", err)
	}
	got := byBackend(results)
	for _, name := range []string{"one", "two"} {
		if !slices.Equal(got[name], []string{"a", "b"}) {
			t.Errorf("backend %s: echoes %q; want a, b", name, got[name])
		}
	}

	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	cs, err := ch.NewStream(context.Background(), desc, bidiMethod, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Header(); err != nil {
		t.Fatalf("headers before any message: %v", err)
	}
	_ = cs.CloseSend()
	var raw []byte
	if err := cs.RecvMsg(&raw); !errors.Is(err, io.EOF) {
		t.Errorf("end of call: %v; want OK", err)
	}
}

// TestFanOutRequestTooLarge: a request the front server refuses ends the
// fanned-out call with that server's status, and every backend's call.
func TestFanOutRequestTooLarge(t *testing.T) {
	recs := []*recorder{newRecorder(), newRecorder()}
	backends := []proxy.Backend{
		{Name: "a", Conn: serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recs[0]) })},
		{Name: "b", Conn: forwardBackend(t, recs[1])},
	}
	front := serve(t, nil, append(proxy.ServerOptions(fanTo(backends...)), grpc.MaxRecvMsgSize(100))...)
	// The bound only turns a hang into a failure.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := fanCall(ctx, t, front, bidiMethod, proxy.DefaultLabelField, msg("small"), msg(strings.Repeat("x", 1000)))
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("call ended with %v; want ResourceExhausted", err)
	}
}
