package tunnel

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// sdGate is a probe whose streaming handler holds its call open until the
// test releases it, or until the call's context ends. Its unary method
// answers at once.
type sdGate struct {
	started chan struct{} // one value per streaming handler that started
	release chan struct{} // closed to let the streaming handlers finish
	ctxDone chan struct{} // one value per handler whose context ended first
	exited  chan struct{} // one value per streaming handler that returned
	once    sync.Once
}

func sdNewGate() *sdGate {
	return &sdGate{
		started: make(chan struct{}, 16),
		release: make(chan struct{}),
		ctxDone: make(chan struct{}, 16),
		exited:  make(chan struct{}, 16),
	}
}

func (g *sdGate) open() { g.once.Do(func() { close(g.release) }) }

func (g *sdGate) probe() *probe {
	return &probe{
		unary: func(context.Context, *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
			return bytesValue([]byte("ok")), nil
		},
		stream: func(s grpc.ServerStream) error {
			defer func() { g.exited <- struct{}{} }()
			g.started <- struct{}{}
			select {
			case <-g.release:
				return s.SendMsg(bytesValue([]byte("released")))
			case <-s.Context().Done():
				g.ctxDone <- struct{}{}
				return s.Context().Err()
			}
		},
	}
}

func sdClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func sdWantCode(t testing.TB, err error, want ...codes.Code) {
	t.Helper()
	got := status.Code(err)
	for _, c := range want {
		if got == c {
			return
		}
	}
	t.Fatalf("got status %v (%v); want one of %v", got, err, want)
}

func sdUnary(cc grpc.ClientConnInterface) error {
	return cc.Invoke(context.Background(), probeUnary, bytesValue(nil), new(wrapperspb.BytesValue))
}

// sdCall is a streaming call to the gate, in progress.
type sdCall struct {
	stream grpc.ClientStream
	result chan error // the call's outcome, once sdCall.finish runs
}

// sdStart opens a streaming call to g through cc and waits until its handler
// runs. The call's context is cancelled at cleanup, so nothing outlives the
// test even if it fails.
func sdStart(t testing.TB, g *sdGate, cc grpc.ClientConnInterface) *sdCall {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
	if err != nil {
		t.Fatalf("starting the streaming call: %v", err)
	}
	recvWithin(t, g.started, "the streaming handler to start")
	c := &sdCall{stream: stream, result: make(chan error, 1)}
	// The caller waits for the outcome in the background, as a caller
	// blocked on a long call would.
	go func() { c.result <- sdFinish(stream) }()
	return c
}

// sdFinish reads the gate's answer and the end of the call.
func sdFinish(stream grpc.ClientStream) error {
	msg := new(wrapperspb.BytesValue)
	if err := stream.RecvMsg(msg); err != nil {
		return err
	}
	if string(msg.GetValue()) != "released" {
		return errors.New("unexpected answer " + string(msg.GetValue()))
	}
	if err := stream.RecvMsg(msg); !errors.Is(err, io.EOF) {
		if err == nil {
			return errors.New("a second answer")
		}
		return err
	}
	return nil
}

type sdServeResult struct {
	started bool
	err     error
}

// sdServe runs rs.Serve in the background; its result arrives on the
// returned channel. The server is stopped at cleanup.
func sdServe(t testing.TB, ctx context.Context, rs *ReverseTunnelServer) <-chan sdServeResult {
	res := make(chan sdServeResult, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		started, err := rs.Serve(ctx)
		res <- sdServeResult{started, err}
	}()
	t.Cleanup(func() {
		rs.Stop()
		<-done
	})
	return res
}

// sdReverse opens one reverse tunnel from a new ReverseTunnelServer serving
// g, and returns the server, the handler's view of the tunnel and the
// channel Serve's result arrives on.
func sdReverse(t testing.TB, ts *testServer, g *sdGate) (*ReverseTunnelServer, TunnelChannel, <-chan sdServeResult) {
	t.Helper()
	rs := NewReverseTunnelServer(ts.stub)
	rs.RegisterService(&probeDesc, g.probe())
	res := sdServe(t, context.Background(), rs)
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 1 })
	return rs, ts.handler.AllReverseTunnels()[0], res
}

func TestShutdownForwardDrain(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(g.probe()))
	ch := forward(t, ts.stub)
	other := forward(t, ts.stub) // an idle tunnel: it ends at once
	call := sdStart(t, g, ch)
	if err := sdUnary(ch); err != nil {
		t.Fatalf("call before the drain: %v", err)
	}

	ts.handler.InitiateShutdown()

	// The server tells the client (drain extension); calls that cross the
	// notice are still served, and once the client knows it starts none.
	waitFor(t, func() bool { return ch.Info().Draining })
	sdWantCode(t, sdUnary(ch), codes.Unavailable)
	// A new streaming call is refused too; the refusal comes with its first
	// receive.
	if s, err := ch.NewStream(context.Background(), probeStreamDesc, probeStream); err != nil {
		sdWantCode(t, err, codes.Unavailable)
	} else {
		sdWantCode(t, s.RecvMsg(new(wrapperspb.BytesValue)), codes.Unavailable)
	}
	_, err := NewChannel(ts.stub).Start(context.Background())
	sdWantCode(t, err, codes.Unavailable)

	recvWithin(t, other.Done(), "the idle tunnel to end")
	if err := other.Err(); err != nil {
		t.Fatalf("Err of the drained idle tunnel = %v; want nil", err)
	}
	if sdClosed(ch.Done()) {
		t.Fatal("the tunnel ended while a call was in progress")
	}
	g.open()
	if err := recvWithin(t, call.result, "the call in progress"); err != nil {
		t.Fatalf("call in progress during the drain: %v", err)
	}
	recvWithin(t, ch.Done(), "the drained tunnel to end")
	if err := ch.Err(); err != nil {
		t.Fatalf("Err of the drained tunnel = %v; want nil", err)
	}
	sdWantCode(t, sdUnary(ch), codes.Unavailable)
	recvWithin(t, g.exited, "the handler to return")
}

func TestShutdownReverseDrain(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	_, tun, res := sdReverse(t, ts, g)
	cc := ts.handler.AsChannel()
	call := sdStart(t, g, cc)
	if err := sdUnary(cc); err != nil {
		t.Fatalf("call before the drain: %v", err)
	}

	ts.handler.InitiateShutdown()

	if cc.Ready() {
		t.Fatal("AsChannel Ready while its only tunnel drains")
	}
	sdWantCode(t, sdUnary(cc), codes.Unavailable)
	sdWantCode(t, sdUnary(tun), codes.Unavailable)
	// New reverse tunnels are refused.
	late := NewReverseTunnelServer(ts.stub)
	late.RegisterService(&probeDesc, g.probe())
	t.Cleanup(late.Stop)
	started, err := late.Serve(context.Background())
	if started {
		t.Fatalf("Serve during the drain = (true, %v); want started false", err)
	}
	sdWantCode(t, err, codes.Unavailable)

	if sdClosed(tun.Done()) {
		t.Fatal("the tunnel ended while a call was in progress")
	}
	select {
	case r := <-res:
		t.Fatalf("Serve returned (%v, %v) while a call was in progress", r.started, r.err)
	default:
	}
	g.open()
	if err := recvWithin(t, call.result, "the call in progress"); err != nil {
		t.Fatalf("call in progress during the drain: %v", err)
	}
	recvWithin(t, tun.Done(), "the drained tunnel to end")
	if err := tun.Err(); err != nil {
		t.Fatalf("Err of the drained tunnel = %v; want nil", err)
	}
	if r := recvWithin(t, res, "Serve to return"); !r.started || r.err != nil {
		t.Fatalf("Serve after the drain = (%v, %v); want (true, nil)", r.started, r.err)
	}
	if n := len(ts.handler.AllReverseTunnels()); n != 0 {
		t.Fatalf("AllReverseTunnels has %d tunnels after the drain", n)
	}
	sdWantCode(t, sdUnary(cc), codes.Unavailable)
	recvWithin(t, g.exited, "the handler to return")
}

func TestShutdownReverseGracefulStop(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	rs, tun, res := sdReverse(t, ts, g)
	cc := ts.handler.AsChannel()
	call := sdStart(t, g, cc)

	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		rs.GracefulStop()
	}()
	t.Cleanup(func() {
		g.open()
		<-stopped
	})

	// New calls are refused once the drain has begun; until then they
	// succeed.
	waitFor(t, func() bool {
		err := sdUnary(cc)
		if err == nil {
			return false
		}
		sdWantCode(t, err, codes.Unavailable)
		return true
	})
	sdWantCode(t, sdUnary(cc), codes.Unavailable)
	if sdClosed(stopped) {
		t.Fatal("GracefulStop returned while a call was in progress")
	}
	if sdClosed(tun.Done()) {
		t.Fatal("the tunnel ended while a call was in progress")
	}
	select {
	case r := <-res:
		t.Fatalf("Serve returned (%v, %v) while a call was in progress", r.started, r.err)
	default:
	}

	g.open()
	if err := recvWithin(t, call.result, "the call in progress"); err != nil {
		t.Fatalf("call in progress during GracefulStop: %v", err)
	}
	if r := recvWithin(t, res, "Serve to return"); !r.started || r.err != nil {
		t.Fatalf("Serve after GracefulStop = (%v, %v); want (true, nil)", r.started, r.err)
	}
	recvWithin(t, stopped, "GracefulStop to return")
	recvWithin(t, tun.Done(), "the handler's end of the tunnel to end")
	if err := tun.Err(); err != nil {
		t.Fatalf("Err of the gracefully stopped tunnel = %v; want nil", err)
	}
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 0 })
	sdWantCode(t, sdUnary(cc), codes.Unavailable)

	started, err := rs.Serve(context.Background())
	if started || !errors.Is(err, ErrServerStopped) {
		t.Fatalf("Serve after GracefulStop = (%v, %v); want (false, ErrServerStopped)", started, err)
	}
	recvWithin(t, g.exited, "the handler to return")
}

func TestShutdownReverseStop(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	rs, tun, res := sdReverse(t, ts, g)
	cc := ts.handler.AsChannel()
	call := sdStart(t, g, cc)

	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		rs.Stop()
	}()
	t.Cleanup(func() {
		g.open()
		<-stopped
	})

	err := recvWithin(t, call.result, "the call in progress to fail")
	sdWantCode(t, err, codes.Unavailable, codes.Canceled)
	recvWithin(t, g.ctxDone, "the handler's context to end")
	recvWithin(t, g.exited, "the handler to return")
	recvWithin(t, stopped, "Stop to return")
	if r := recvWithin(t, res, "Serve to return"); !r.started || r.err != nil {
		t.Fatalf("Serve after Stop = (%v, %v); want (true, nil)", r.started, r.err)
	}
	recvWithin(t, tun.Done(), "the handler's end of the tunnel to end")
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 0 })
	sdWantCode(t, sdUnary(cc), codes.Unavailable)

	started, err := rs.Serve(context.Background())
	if started || !errors.Is(err, ErrServerStopped) {
		t.Fatalf("Serve after Stop = (%v, %v); want (false, ErrServerStopped)", started, err)
	}
}

func TestShutdownForwardClose(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(g.probe()))
	ch := forward(t, ts.stub)
	call := sdStart(t, g, ch)
	t.Cleanup(g.open)

	ch.Close()

	if !sdClosed(ch.Done()) {
		t.Fatal("Done not closed when Close returned")
	}
	if err := ch.Err(); err != nil {
		t.Fatalf("Err of a closed tunnel = %v; want nil", err)
	}
	sdWantCode(t, recvWithin(t, call.result, "the call in progress to fail"), codes.Unavailable)
	recvWithin(t, g.ctxDone, "the handler's context to end")
	recvWithin(t, g.exited, "the handler to return")
	sdWantCode(t, sdUnary(ch), codes.Unavailable)
	ch.Close() // again: a no-op
}

func TestShutdownStartContextCancelled(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(g.probe()))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := NewChannel(ts.stub).Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ch.Close)
	t.Cleanup(g.open)
	if err := sdUnary(ch); err != nil {
		t.Fatalf("call on the open tunnel: %v", err)
	}
	call := sdStart(t, g, ch)

	cancel()

	recvWithin(t, ch.Done(), "the tunnel to end")
	sdWantCode(t, recvWithin(t, call.result, "the call in progress to fail"), codes.Unavailable)
	recvWithin(t, g.ctxDone, "the handler's context to end")
	recvWithin(t, g.exited, "the handler to return")
	for range 3 {
		sdWantCode(t, sdUnary(ch), codes.Unavailable)
	}
	if _, err := ch.NewStream(context.Background(), probeStreamDesc, probeStream); status.Code(err) != codes.Unavailable {
		t.Fatalf("NewStream on the ended tunnel: %v; want Unavailable", err)
	}
}

func TestShutdownServerDies(t *testing.T) {
	g := sdNewGate()
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(g.probe()))
	ch := forward(t, ts.stub)
	call := sdStart(t, g, ch)
	t.Cleanup(g.open)

	ts.server.Stop()

	sdWantCode(t, recvWithin(t, call.result, "the call in progress to fail"), codes.Unavailable)
	recvWithin(t, ch.Done(), "the tunnel to end")
	if err := ch.Err(); err == nil {
		t.Fatal("Err of a tunnel whose server died is nil")
	}
	recvWithin(t, g.ctxDone, "the handler's context to end")
	recvWithin(t, g.exited, "the handler to return")
	sdWantCode(t, sdUnary(ch), codes.Unavailable)
}
