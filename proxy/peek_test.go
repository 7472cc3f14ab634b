package proxy_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// byContent routes each call by its first request message: a payload that
// starts with "a" goes to backend a, one that starts with "both" fans out to
// a and b, anything else goes to b.
func byContent(a, b grpc.ClientConnInterface) proxy.Director {
	return func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		data, err := call.Peek()
		if err != nil {
			return proxy.Route{}, err
		}
		m := new(grpchantesting.Message)
		if err := proto.Unmarshal(data, m); err != nil {
			return proxy.Route{}, status.Errorf(codes.InvalidArgument, "not a Message: %v", err)
		}
		md, _ := metadata.FromIncomingContext(ctx)
		switch p := string(m.GetPayload()); {
		case strings.HasPrefix(p, "both"):
			return proxy.Route{Backends: []proxy.Backend{{Name: "a", Conn: a}, {Name: "b", Conn: b}}, Metadata: md.Copy()}, nil
		case strings.HasPrefix(p, "a"):
			return proxy.To(a, md.Copy()), nil
		default:
			return proxy.To(b, md.Copy()), nil
		}
	}
}

// TestPeekRoutesByContent: a director that reads the first request message
// to route the call; the message still reaches the backend, first and
// intact.
func TestPeekRoutesByContent(t *testing.T) {
	setup := func(t *testing.T) (recA, recB *recorder, front *grpc.ClientConn) {
		recA, recB = newRecorder(), newRecorder()
		a := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recA) })
		b := forwardBackend(t, recB)
		return recA, recB, serve(t, nil, proxy.ServerOptions(byContent(a, b))...)
	}
	ctx := context.Background()

	t.Run("unary", func(t *testing.T) {
		recA, recB, front := setup(t)
		cli := grpchantesting.NewTestServiceClient(front)
		for _, p := range []string{"a-one", "b-one", "a-two"} {
			resp, err := cli.Unary(ctx, msg(p))
			if err != nil || string(resp.GetPayload()) != p {
				t.Fatalf("Unary(%s) = %q, %v", p, resp.GetPayload(), err)
			}
		}
		if got := recA.payloads(); !slices.Equal(got, []string{"a-one", "a-two"}) {
			t.Errorf("a received %q", got)
		}
		if got := recB.payloads(); !slices.Equal(got, []string{"b-one"}) {
			t.Errorf("b received %q", got)
		}
	})
	t.Run("client stream", func(t *testing.T) {
		recA, recB, front := setup(t)
		cli := grpchantesting.NewTestServiceClient(front)
		send := func(payloads ...string) *grpchantesting.Message {
			t.Helper()
			cs, err := cli.ClientStream(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range payloads {
				if err := cs.Send(msg(p)); err != nil {
					t.Fatal(err)
				}
			}
			resp, err := cs.CloseAndRecv()
			if err != nil {
				t.Fatal(err)
			}
			return resp
		}
		if resp := send("b-first", "x", "y"); resp.GetCount() != 3 || string(resp.GetPayload()) != "y" {
			t.Errorf("b answered count %d, last %q; want 3, y", resp.GetCount(), resp.GetPayload())
		}
		if resp := send("a-first", "z"); resp.GetCount() != 2 {
			t.Errorf("a answered count %d; want 2", resp.GetCount())
		}
		if got := recB.payloads(); !slices.Equal(got, []string{"b-first", "x", "y"}) {
			t.Errorf("b received %q", got)
		}
		if got := recA.payloads(); !slices.Equal(got, []string{"a-first", "z"}) {
			t.Errorf("a received %q", got)
		}
	})
	t.Run("fan-out", func(t *testing.T) {
		// The peeked message is shared by every backend like the others.
		recA, recB, front := setup(t)
		results, err := fanCall(ctx, t, front, clientStreamMethod, proxy.DefaultLabelField, msg("both"), msg("then"))
		if err != nil {
			t.Fatalf("call ended with %v; want OK", err)
		}
		if len(results) != 2 {
			t.Fatalf("%d results; want 2", len(results))
		}
		for _, r := range []*recorder{recA, recB} {
			if got := r.payloads(); !slices.Equal(got, []string{"both", "then"}) {
				t.Errorf("a backend received %q; want both, then", got)
			}
		}
	})
}

// TestPeekEmptyRequestStream: a client that half-closes without sending
// makes Peek return io.EOF, and the backends see a request stream with no
// messages.
func TestPeekEmptyRequestStream(t *testing.T) {
	recs := []*recorder{newRecorder(), newRecorder()}
	a := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recs[0]) })
	b := reverseBackend(t, recs[1])
	peeked := make(chan error, 4)
	var fan atomic.Bool
	director := func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		_, err := call.Peek()
		peeked <- err
		md, _ := metadata.FromIncomingContext(ctx)
		if fan.Load() {
			return proxy.Route{Backends: []proxy.Backend{{Name: "a", Conn: a}, {Name: "b", Conn: b}}, Metadata: md.Copy()}, nil
		}
		return proxy.To(a, md.Copy()), nil
	}
	front := serve(t, nil, proxy.ServerOptions(director)...)

	t.Run("one backend", func(t *testing.T) {
		cs, err := grpchantesting.NewTestServiceClient(front).ClientStream(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		resp, err := cs.CloseAndRecv()
		if err != nil || resp.GetCount() != 0 {
			t.Fatalf("backend answered count %d, %v; want 0, OK", resp.GetCount(), err)
		}
		if err := <-peeked; !errors.Is(err, io.EOF) {
			t.Errorf("Peek returned %v; want io.EOF", err)
		}
	})
	t.Run("fan-out", func(t *testing.T) {
		fan.Store(true)
		results, err := fanCall(context.Background(), t, front, clientStreamMethod, proxy.DefaultLabelField)
		if err != nil {
			t.Fatalf("call ended with %v; want OK", err)
		}
		if len(results) != 2 {
			t.Fatalf("%d results; want 2", len(results))
		}
		for _, r := range results {
			if r.msg.GetCount() != 0 {
				t.Errorf("%s counted %d requests", r.label.GetBackend(), r.msg.GetCount())
			}
		}
		if err := <-peeked; !errors.Is(err, io.EOF) {
			t.Errorf("Peek returned %v; want io.EOF", err)
		}
	})
	for i, r := range recs {
		if got := r.payloads(); len(got) != 0 {
			t.Errorf("backend %d received %q", i, got)
		}
	}
}

// TestPeekClientCancels: a director waiting in Peek when the client cancels
// gets the call's status, and nothing is left behind (goleak).
func TestPeekClientCancels(t *testing.T) {
	peeking := make(chan struct{}, 1)
	peeked := make(chan error, 1)
	front := serve(t, nil, proxy.ServerOptions(func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		peeking <- struct{}{}
		_, err := call.Peek()
		peeked <- err
		return proxy.Route{}, err
	})...)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	cs, err := front.NewStream(ctx, desc, clientStreamMethod)
	if err != nil {
		t.Fatal(err)
	}
	await(t, peeking, "the director to peek")
	cancel()
	if err := cs.RecvMsg(new(grpchantesting.Message)); status.Code(err) != codes.Canceled {
		t.Errorf("client got %v; want Canceled", err)
	}
	select {
	case err := <-peeked:
		if status.Code(err) != codes.Canceled {
			t.Errorf("Peek returned %v; want Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Peek did not return")
	}
}
