package tunnel

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func TestBackoffDoublesToTheCapAndResets(t *testing.T) {
	b := backoff{min: 10 * time.Millisecond, max: 70 * time.Millisecond, rand: func(n int64) int64 { return n - 1 }}
	b.init()
	var got []time.Duration
	for range 5 {
		got = append(got, b.next())
	}
	want := []time.Duration{10, 20, 40, 70, 70}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("delays %v; want %v ms", got, want)
		}
	}
	b.reset()
	if d := b.next(); d != 10*time.Millisecond {
		t.Fatalf("after reset the delay is %v; want 10ms", d)
	}
	// Full jitter: the draw may be anywhere down to zero.
	b.rand = func(int64) int64 { return 0 }
	if d := b.next(); d != 0 {
		t.Fatalf("smallest draw %v; want 0", d)
	}
}

// stateLog records state changes for tests.
type stateLog struct {
	mu      sync.Mutex
	changes []StateChange
}

func (l *stateLog) add(c StateChange) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.changes = append(l.changes, c)
}

func (l *stateLog) count(state TunnelState) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, c := range l.changes {
		if c.State == state {
			n++
		}
	}
	return n
}

func TestReconnectKeepsTunnelsOpen(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	rs := NewReverseTunnelServer(ts.stub)
	testServices(echoProbe())(rs)
	var log stateLog
	done := make(chan error, 1)
	go func() {
		done <- rs.ServeWithReconnect(context.Background(), ReconnectOptions{
			Tunnels: 3, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, OnStateChange: log.add,
		})
	}()
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 3 })
	first := ts.handler.AllReverseTunnels()
	for _, ch := range first {
		ch.Close()
	}
	// Every tunnel comes back, as a new one.
	waitFor(t, func() bool {
		now := ts.handler.AllReverseTunnels()
		if len(now) != 3 {
			return false
		}
		for _, ch := range now {
			for _, old := range first {
				if ch == old {
					return false
				}
			}
		}
		return true
	})
	if _, err := unary(context.Background(), ts.handler.AsChannel(), []byte("x")); err != nil {
		t.Fatal(err)
	}
	rs.Stop()
	if err := <-done; err != nil {
		t.Fatalf("ServeWithReconnect after Stop = %v; want nil", err)
	}
	if got := log.count(TunnelStopped); got != 3 {
		t.Fatalf("%d tunnels reported stopped; want 3", got)
	}
	if got := log.count(TunnelOpen); got < 6 {
		t.Fatalf("%d openings reported; want at least 6", got)
	}
}

// TestReconnectWaitsForTheServer starts with nothing listening: attempts
// fail and back off until a server appears, then the tunnel opens.
// Cancelling the context ends it all.
func TestReconnectWaitsForTheServer(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close() // nothing listens there for now

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rs := NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	testServices(echoProbe())(rs)
	var log stateLog
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- rs.ServeWithReconnect(ctx, ReconnectOptions{MinBackoff: time.Millisecond, MaxBackoff: 20 * time.Millisecond, OnStateChange: log.add})
	}()
	waitFor(t, func() bool { return log.count(TunnelWaiting) >= 3 })

	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("could not listen on %s again: %v", addr, err)
	}
	handler := NewTunnelServiceHandler(TunnelServiceHandlerOptions{})
	srv := grpc.NewServer()
	tunnelpb.RegisterTunnelServiceServer(srv, handler.Service())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	defer func() {
		srv.Stop()
		<-served
	}()
	waitFor(t, func() bool { return len(handler.AllReverseTunnels()) == 1 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeWithReconnect after cancel = %v; want context.Canceled", err)
	}
	if log.count(TunnelStopped) != 1 {
		t.Fatal("the tunnel did not report it stopped")
	}
}
