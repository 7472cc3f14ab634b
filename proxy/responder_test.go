package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// rawResults calls method on conn as a server-streaming call with req and
// returns every message's bytes, the status and the trailers.
func rawResults(t *testing.T, conn grpc.ClientConnInterface, method string, req proto.Message) ([][]byte, metadata.MD, error) {
	t.Helper()
	cs, err := conn.NewStream(context.Background(), &grpc.StreamDesc{ServerStreams: true}, method, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.SendMsg(req); err != nil {
		t.Fatal(err)
	}
	if err := cs.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for {
		var raw []byte
		if err := cs.RecvMsg(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			return out, cs.Trailer(), err
		}
		out = append(out, raw)
	}
}

// payloads decodes raws as grpchantesting.Messages and returns their
// payloads, sorted.
func payloads(t *testing.T, raws [][]byte) []string {
	t.Helper()
	var out []string
	for _, raw := range raws {
		m := new(grpchantesting.Message)
		if err := proto.Unmarshal(raw, m); err != nil {
			t.Fatalf("%x: %v", raw, err)
		}
		out = append(out, string(m.GetPayload()))
	}
	slices.Sort(out)
	return out
}

// TestFanOutTrailersWithLabels: the default labels are unchanged, and the
// trailers count the backends and their failures.
func TestFanOutTrailersWithLabels(t *testing.T) {
	ok := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, newRecorder()) })
	failing := newRecorder()
	failing.fail = status.New(codes.Aborted, "no")
	bad := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, failing) })
	front := serve(t, nil, proxy.ServerOptions(fanTo(
		proxy.Backend{Name: "ok", Conn: ok},
		proxy.Backend{Name: "failing", Conn: bad},
		proxy.Backend{Name: "none"},
	))...)

	raws, tr, err := rawResults(t, front, unaryMethod, msg("x"))
	if err != nil {
		t.Fatalf("call ended with %v; want OK", err)
	}
	labels := map[string]codes.Code{}
	for _, raw := range raws {
		payload, label, err := proxy.SplitLabel(raw, proxy.DefaultLabelField)
		if err != nil || label == nil {
			t.Fatalf("SplitLabel(%x) = %v, %v; want a label", raw, label, err)
		}
		labels[label.GetBackend()] = status.FromProto(label.GetStatus()).Code()
		if label.GetBackend() == "ok" {
			m := new(grpchantesting.Message)
			if err := proto.Unmarshal(payload, m); err != nil || string(m.GetPayload()) != "x" {
				t.Errorf("ok's payload %x (%v); want x", payload, err)
			}
		}
	}
	if want := map[string]codes.Code{"ok": codes.OK, "failing": codes.Aborted, "none": codes.Unavailable}; fmt.Sprint(labels) != fmt.Sprint(want) {
		t.Errorf("labels %v; want %v", labels, want)
	}
	checkTrailer(t, tr, "3", "2")
}

// TestFanOutOneBackendLabels: Route.FanOut labels the one backend's
// responses as a fan-out to several would.
func TestFanOutOneBackendLabels(t *testing.T) {
	ok := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, newRecorder()) })
	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.Route{Backends: []proxy.Backend{{Name: "only", Conn: ok}}, Metadata: md.Copy(), FanOut: true}, nil
	}
	front := serve(t, nil, proxy.ServerOptions(director)...)
	results, err := fanCall(context.Background(), t, front, serverStreamMethod, proxy.DefaultLabelField, &grpchantesting.Message{Payload: []byte("y"), Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	if got := byBackend(results); fmt.Sprint(got) != fmt.Sprint(map[string][]string{"only": {"y", "y"}}) {
		t.Errorf("results %v; want two labelled y from only", got)
	}
}

// TestResponder: a custom Responder for the handler, and one a route
// names in its place.
func TestResponder(t *testing.T) {
	ok := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, newRecorder()) })
	// The same backend, under a name whose messages the Responder refuses.
	backends := []proxy.Backend{{Name: "ok", Conn: ok}, {Name: "refused", Conn: ok}, {Name: "none"}}
	custom := &proxy.Responder{
		Message: func(b proxy.Backend, unary bool, msg []byte) ([]byte, error) {
			if b.Name == "refused" {
				return nil, errors.New("not this one")
			}
			m := new(grpchantesting.Message)
			if err := proto.Unmarshal(msg, m); err != nil {
				return nil, err
			}
			if string(m.GetPayload()) == "drop" {
				return nil, nil
			}
			m.Payload = fmt.Appendf(nil, "%s %s unary=%t", b.Name, m.GetPayload(), unary)
			return proto.Marshal(m)
		},
		Failure: func(b proxy.Backend, unary bool, st *status.Status) []byte {
			out, _ := proto.Marshal(&grpchantesting.Message{Payload: fmt.Appendf(nil, "%s failed: %s %s", b.Name, st.Code(), st.Message())})
			return out
		},
	}
	merging := &proxy.Responder{
		Message: custom.Message,
		Failure: custom.Failure,
		Merge: func(msgs [][]byte) ([]byte, error) {
			// Concatenated Messages merge into one, the last payload
			// winning: count how many there were instead.
			return proto.Marshal(&grpchantesting.Message{Payload: fmt.Appendf(nil, "%d merged", len(msgs))})
		},
	}
	var route *proxy.Responder // what the route names, per subtest
	unary := false
	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.Route{Backends: backends, Metadata: md.Copy(), Responder: route, Unary: unary}, nil
	}
	front := serve(t, nil, proxy.ServerOptions(director, proxy.WithResponder(custom))...)

	for _, tc := range []struct {
		name    string
		route   *proxy.Responder
		unary   bool
		payload string
		want    []string
	}{
		{"handler's", nil, false, "x", []string{
			"none failed: Unavailable proxy: no connection for backend \"none\"",
			"ok x unary=false",
			"refused failed: Internal proxy: responder: not this one",
		}},
		{"unary without Merge", nil, true, "x", []string{
			"none failed: Unavailable proxy: no connection for backend \"none\"",
			"ok x unary=true",
			"refused failed: Internal proxy: responder: not this one",
		}},
		{"dropped", nil, false, "drop", []string{
			"none failed: Unavailable proxy: no connection for backend \"none\"",
			"refused failed: Internal proxy: responder: not this one",
		}},
		// The messages pass unchanged, and the failure is reported in
		// the trailers only.
		{"route's, all nil", &proxy.Responder{}, false, "x", []string{"x", "x"}},
		{"route's, merged", merging, true, "x", []string{"3 merged"}},
		{"route's, not unary", merging, false, "drop", []string{
			"none failed: Unavailable proxy: no connection for backend \"none\"",
			"refused failed: Internal proxy: responder: not this one",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			route, unary = tc.route, tc.unary
			raws, tr, err := rawResults(t, front, unaryMethod, msg(tc.payload))
			if err != nil {
				t.Fatalf("call ended with %v; want OK", err)
			}
			if got := payloads(t, raws); !slices.Equal(got, tc.want) {
				t.Errorf("results %q; want %q", got, tc.want)
			}
			failed := "2" // refused and none
			if tc.route != nil && tc.route.Message == nil {
				failed = "1" // none: refused is not refused
			}
			checkTrailer(t, tr, "3", failed)
		})
	}
}

// TestResponderMergeFails: a Merge error fails the call with Internal.
func TestResponderMergeFails(t *testing.T) {
	ok := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, newRecorder()) })
	r := &proxy.Responder{Merge: func([][]byte) ([]byte, error) { return nil, errors.New("cannot") }}
	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.Route{Backends: []proxy.Backend{{Conn: ok}, {Conn: ok}}, Metadata: md.Copy(), Unary: true, Responder: r}, nil
	}
	front := serve(t, nil, proxy.ServerOptions(director)...)
	err := front.Invoke(context.Background(), unaryMethod, msg("x"), new(grpchantesting.Message))
	if st := status.Convert(err); st.Code() != codes.Internal || st.Message() != "proxy: merging the results: cannot" {
		t.Errorf("call ended with %v; want Internal, the merge's error", err)
	}
}
