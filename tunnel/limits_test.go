package tunnel

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// holdingProbe's stream handler sends its headers, then waits until the
// call ends, without reading.
var holdingProbe = &probe{stream: func(ss grpc.ServerStream) error {
	if err := ss.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	<-ss.Context().Done()
	return nil
}}

// openHeld opens a stream on holdingProbe and waits until the handler runs.
func openHeld(ctx context.Context, cc grpc.ClientConnInterface) (grpc.ClientStream, error) {
	cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
	if err != nil {
		return nil, err
	}
	_, err = cs.Header()
	return cs, err
}

func TestLimitConcurrentStreams(t *testing.T) {
	t.Run("server refuses", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithMaxConcurrentStreams(2)}}, testServices(holdingProbe))
		cc := forward(t, ts.stub)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		firstCtx, cancelFirst := context.WithCancel(ctx)
		if _, err := openHeld(firstCtx, cc); err != nil {
			t.Fatal(err)
		}
		if _, err := openHeld(ctx, cc); err != nil {
			t.Fatal(err)
		}
		_, err := openHeld(ctx, cc)
		wantCode(t, err, codes.ResourceExhausted)
		// Ending a call makes room for another, once the server has seen
		// the cancel.
		cancelFirst()
		waitFor(t, func() bool {
			_, err := openHeld(ctx, cc)
			return err == nil
		})
	})
	t.Run("client refuses", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(holdingProbe))
		cc := forward(t, ts.stub, WithMaxConcurrentStreams(1))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		if _, err := openHeld(ctx, cc); err != nil {
			t.Fatal(err)
		}
		_, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
		wantCode(t, err, codes.ResourceExhausted)
	})
}

func TestLimitHeaderListSize(t *testing.T) {
	big := strings.Repeat("x", 4096)
	p := &probe{unary: func(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		if string(in.GetValue()) == "big trailer" {
			_ = grpc.SetTrailer(ctx, metadata.Pairs("t", big))
		}
		return in, nil
	}}
	opts := []TunnelOption{WithMaxHeaderListSize(2048)}
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: opts}, testServices(p))
	cc := forward(t, ts.stub, opts...)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "h", big)
	_, err := unary(ctx, cc, nil)
	wantCode(t, err, codes.ResourceExhausted)
	_, err = unary(context.Background(), cc, []byte("big trailer"))
	wantCode(t, err, codes.ResourceExhausted)
	if _, err := unary(context.Background(), cc, []byte("small")); err != nil {
		t.Fatalf("the tunnel is still usable: %v", err)
	}
}

// TestLimitBufferedBytes fills a tunnel's budget with data its handlers do
// not read, spread over streams that each stay within their window: the
// stream that would exceed the budget fails, and the budget is whole again
// once the calls end.
func TestLimitBufferedBytes(t *testing.T) {
	blocked := &probe{stream: func(ss grpc.ServerStream) error {
		<-ss.Context().Done()
		return nil
	}}
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithMaxBufferedBytes(100_000)}}, testServices(blocked))
	r := openRaw(t, ts.stub, true)
	r.recv() // settings
	for id := int64(1); id <= 2; id++ {
		r.send(newStreamFrame(id, probeStream, rev1, 65536))
		r.sendMessage(id, make([]byte, 60000)) // within the window, 120000 in all
	}
	if _, st := r.readResponse(2, false); st.Code() != codes.ResourceExhausted {
		t.Fatalf("the stream over the budget ended with %v; want ResourceExhausted", st)
	}
	var srv *tunnelServer
	ts.handler.forwardTunnels.Range(func(k, _ any) bool { srv = k.(*tunnelServer); return false })
	if used := srv.buffered.used.Load(); used != 60000 {
		t.Fatalf("budget holds %d bytes; want the 60000 of the surviving stream", used)
	}
	r.send(cancelFrame(1))
	waitFor(t, func() bool { return srv.buffered.used.Load() == 0 })
}

// TestLimitBudgetReturns runs ordinary traffic and checks that every byte
// charged to the tunnels' budgets comes back.
func TestLimitBudgetReturns(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(producer))
	ch := forward(t, ts.stub).(*tunnelClient)
	for range 3 {
		cs, err := produce(context.Background(), ch, 3<<20, 100_000)
		if err != nil {
			t.Fatal(err)
		}
		for {
			if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
				break
			}
		}
		if _, err := unary(context.Background(), ch, make([]byte, 300_000)); err != nil {
			t.Fatal(err)
		}
	}
	var srv *tunnelServer
	ts.handler.forwardTunnels.Range(func(k, _ any) bool { srv = k.(*tunnelServer); return false })
	waitFor(t, func() bool { return ch.buffered.used.Load() == 0 && srv.buffered.used.Load() == 0 })
}

func TestLimitReverseTunnels(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{
		MaxReverseTunnels:       3,
		MaxReverseTunnelsPerKey: 2,
		AffinityKey: func(ch TunnelChannel) any {
			md, _ := metadata.FromIncomingContext(ch.Context())
			return md.Get("key")[0]
		},
	}, nil)
	type result struct {
		started bool
		err     error
	}
	// serve opens a reverse tunnel with key; its Serve's result arrives on
	// the returned channel when it returns.
	serve := func(key string) <-chan result {
		rs := NewReverseTunnelServer(ts.stub)
		res := make(chan result, 1)
		go func() {
			started, err := rs.Serve(metadata.AppendToOutgoingContext(context.Background(), "key", key))
			res <- result{started, err}
		}()
		t.Cleanup(func() {
			rs.Stop()
		})
		return res
	}
	open := func(n int) {
		waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == n })
	}
	serve("a")
	serve("a")
	open(2)
	if r := <-serve("a"); !r.started || status.Code(r.err) != codes.ResourceExhausted {
		t.Fatalf("third tunnel for key a: %+v; want it closed with ResourceExhausted", r)
	}
	serve("b")
	open(3)
	if r := <-serve("c"); r.started || status.Code(r.err) != codes.ResourceExhausted {
		t.Fatalf("tunnel beyond the total: %+v; want it refused with ResourceExhausted", r)
	}
	if n := len(ts.handler.AllReverseTunnels()); n != 3 {
		t.Fatalf("%d reverse tunnels; want 3", n)
	}
}
