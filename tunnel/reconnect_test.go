package tunnel

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

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

// fakeClock is a clock that moves only when told.
type fakeClock struct {
	base   time.Time
	offset atomic.Int64
}

func newFakeClock() *fakeClock { return &fakeClock{base: time.Now()} }

func (c *fakeClock) now() time.Time          { return c.base.Add(time.Duration(c.offset.Load())) }
func (c *fakeClock) advance(d time.Duration) { c.offset.Add(int64(d)) }

// highest draws the top of the range, so that every delay is its ceiling.
func highest(n int64) int64 { return n - 1 }

var (
	errBoom    = status.Error(codes.Internal, "boom")
	errRefused = status.Error(codes.Unavailable, "connection refused")
)

// TestBackoffWhileTheServerRestarts walks the backoff through a server's
// drain and restart: a clean end starts again from MinBackoff, refusals
// while it shuts down and failures to reach it shortly after stay below
// four times MinBackoff, and everything else, or the same failures once
// the restart window has passed, grows as before.
func TestBackoffWhileTheServerRestarts(t *testing.T) {
	clock := newFakeClock()
	b := backoff{min: 10 * time.Millisecond, max: time.Second, rand: highest, now: clock.now}
	b.init()
	ms := time.Millisecond
	expect := func(what string, got time.Duration, want time.Duration) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: delay %v; want %v", what, got, want)
		}
	}
	// Real failures grow past the restart cap.
	for _, want := range []time.Duration{10, 20, 40, 80} {
		expect("failure", b.after(false, 0, errBoom), want*ms)
	}
	// A tunnel that opens and fails is a failure too.
	b.opened()
	expect("opened and failed", b.after(true, 50*ms, errRefused), 160*ms)
	// The server drains a tunnel that had been open a while: start over.
	b.opened()
	expect("clean end", b.after(true, 50*ms, nil), 10*ms)
	// It refuses new tunnels while it shuts down: capped at 40 ms.
	for _, want := range []time.Duration{20, 40, 40, 40} {
		expect("shutting down", b.after(false, 0, errShuttingDown), want*ms)
	}
	// Then it cannot be reached, for a while: still capped.
	clock.advance(restartWindow - time.Millisecond)
	expect("unreachable in the window", b.after(false, 0, errRefused), 40*ms)
	// Another kind of failure is not a restart.
	expect("other failure in the window", b.after(false, 0, errBoom), 40*ms)
	expect("unreachable in the window, after that", b.after(false, 0, errRefused), 40*ms)
	// Past the window, unreachable is an outage: it grows again.
	clock.advance(time.Millisecond)
	for _, want := range []time.Duration{40, 80, 160, 320} {
		expect("unreachable past the window", b.after(false, 0, errRefused), want*ms)
	}
	// A refusal while shutting down brings the delay back under the cap.
	expect("shutting down after an outage", b.after(false, 0, errShuttingDown), 40*ms)
	// A server that closes every tunnel as soon as it opens gets no tight
	// loop: such a clean end is no fresh start.
	for range 3 {
		b.opened()
		expect("closed at once", b.after(true, ms, nil), 40*ms)
	}
	// Once a tunnel opens, the server is back: failing to reach it again
	// is an outage.
	b.opened()
	expect("opened, then unreachable", b.after(true, 5*ms, errRefused), 40*ms)
	expect("unreachable again", b.after(false, 0, errRefused), 80*ms)
	// The cap is never above MaxBackoff.
	small := backoff{min: 10 * time.Millisecond, max: 25 * time.Millisecond, rand: highest, now: clock.now}
	small.init()
	if small.restartCap != 25*time.Millisecond {
		t.Fatalf("restart cap %v; want MaxBackoff, 25ms", small.restartCap)
	}
}

// scriptedServer is a network server whose every reverse tunnel attempt
// is handled by the next function the test sends it.
type scriptedServer chan func(tunnelpb.TunnelService_OpenReverseTunnelServer) error

func (s scriptedServer) serve(stream tunnelpb.TunnelService_OpenReverseTunnelServer) error {
	select {
	case f := <-s:
		return f(stream)
	case <-stream.Context().Done():
		return stream.Context().Err()
	}
}

func refuse(err error) func(tunnelpb.TunnelService_OpenReverseTunnelServer) error {
	return func(tunnelpb.TunnelService_OpenReverseTunnelServer) error { return err }
}

func delegate(h *TunnelServiceHandler) func(tunnelpb.TunnelService_OpenReverseTunnelServer) error {
	return h.Service().OpenReverseTunnel
}

// TestReconnectAcrossAServerRestart runs ServeWithReconnect against a
// server that fails, drains, refuses while shutting down, cannot be
// reached, and comes back as a new handler, and checks the delay of every
// attempt: each is its ceiling, since the random draw is fixed at the top.
func TestReconnectAcrossAServerRestart(t *testing.T) {
	script := make(scriptedServer)
	stub := startFake(t, &fakeNetworkServer{reverse: script.serve})
	rs := NewReverseTunnelServer(stub)
	testServices(echoProbe())(rs)
	t.Cleanup(rs.Stop) // if the test fails half way
	clock := newFakeClock()
	events := make(chan StateChange, 64)
	done := make(chan error, 1)
	go func() {
		done <- rs.ServeWithReconnect(context.Background(), ReconnectOptions{
			MinBackoff: time.Millisecond, MaxBackoff: time.Second,
			OnStateChange: func(c StateChange) { events <- c },
			rand:          highest, now: clock.now,
		})
	}()
	// next returns the next change that is not an attempt starting.
	next := func() StateChange {
		t.Helper()
		for {
			select {
			case c := <-events:
				if c.State != TunnelConnecting {
					return c
				}
			case err := <-done:
				t.Fatalf("ServeWithReconnect returned early: %v", err)
			case <-time.After(10 * time.Second):
				t.Fatal("no state change")
			}
		}
	}
	ms := time.Millisecond
	// attempt serves one attempt with f and checks what the client makes
	// of it: the error it reports and the delay before the next attempt.
	attempt := func(what string, f func(tunnelpb.TunnelService_OpenReverseTunnelServer) error, wantErr error, wantDelay time.Duration) {
		t.Helper()
		script <- f
		c := next()
		if c.State != TunnelWaiting || status.Code(c.Err) != status.Code(wantErr) || c.Delay != wantDelay {
			t.Fatalf("%s: %v, %v, delay %v; want waiting, %v, delay %v", what, c.State, c.Err, c.Delay, wantErr, wantDelay)
		}
	}
	// open serves one attempt with h and waits for the tunnel to open.
	open := func(h *TunnelServiceHandler) {
		t.Helper()
		script <- delegate(h)
		if c := next(); c.State != TunnelOpen {
			t.Fatalf("tunnel %v (%v); want open", c.State, c.Err)
		}
	}

	// A real failure backs off exponentially, past the restart cap (4 ms).
	for _, d := range []time.Duration{1, 2, 4, 8} {
		attempt("failure", refuse(errBoom), errBoom, d*ms)
	}
	// The server drains a tunnel open for a while: the client comes back
	// after MinBackoff at most, whatever it had grown to.
	old := NewTunnelServiceHandler(TunnelServiceHandlerOptions{})
	open(old)
	clock.advance(10 * ms)
	old.InitiateShutdown()
	if c := next(); c.State != TunnelWaiting || c.Err != nil || c.Delay != ms {
		t.Fatalf("after a drain: %v, %v, delay %v; want waiting, no error, delay 1ms", c.State, c.Err, c.Delay)
	}
	// While it shuts down it refuses; the delay stays under the cap.
	for _, d := range []time.Duration{2, 4, 4, 4} {
		attempt("shutting down", delegate(old), errShuttingDown, d*ms)
	}
	// Then it is gone for a while: still under the cap.
	for range 2 {
		attempt("restarting", refuse(errRefused), errRefused, 4*ms)
	}
	// Much later, still gone: an outage, which backs off again.
	clock.advance(restartWindow)
	for _, d := range []time.Duration{4, 8, 16} {
		attempt("gone", refuse(errRefused), errRefused, d*ms)
	}
	// A new server takes the tunnel.
	restarted := NewTunnelServiceHandler(TunnelServiceHandlerOptions{})
	open(restarted)
	waitFor(t, func() bool { return len(restarted.AllReverseTunnels()) == 1 })
	if _, err := unary(context.Background(), restarted.AsChannel(), []byte("x")); err != nil {
		t.Fatal(err)
	}
	rs.Stop()
	if err := <-done; err != nil {
		t.Fatalf("ServeWithReconnect after Stop = %v; want nil", err)
	}
}
