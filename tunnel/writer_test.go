package tunnel

import (
	"context"
	"errors"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// These tests play a peer that stops reading the outer stream, so that its
// gRPC flow-control window fills and a send on it blocks for as long as the
// outer stream lives. Every other goroutine that wants to send then waits
// for the sender's turn; it must give up when its call or the tunnel ends,
// and a tunnel whose peer is dead must release everything once its
// keepalive gives it up. The file keeps its own helpers (wr*), so that it
// does not depend on how the other test files are arranged.

// wrPatience bounds every wait of these tests: far longer than anything
// should take, so that only a hang fails them.
const wrPatience = 20 * time.Second

// wrDeadline is a deadline short enough to pass while a call waits for the
// turn; the test awaits the call's end rather than sleeping for it.
const wrDeadline = 50 * time.Millisecond

// wrFloodMethod is a streaming method whose handler sends 64 KiB responses
// until a send fails, and reports that failure on errs.
const wrFloodMethod = "/grpctunnel.test.Writer/Flood"

type wrFlood struct{ errs chan error }

var wrDesc = grpc.ServiceDesc{
	ServiceName: "grpctunnel.test.Writer",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Flood",
		ServerStreams: true,
		ClientStreams: true,
		Handler: func(srv any, ss grpc.ServerStream) error {
			f := srv.(*wrFlood)
			m := wrapperspb.Bytes(make([]byte, 64<<10))
			for {
				if err := ss.SendMsg(m); err != nil {
					f.errs <- err
					return err
				}
			}
		},
	}},
}

// wrUntil waits for cond, failing the test if it does not hold in time. It
// polls: yielding at first, then pausing briefly between checks, so that a
// long wait does not take a core from the goroutines it waits for.
func wrUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wrPatience)
	for spins := 0; !cond(); spins++ {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s\n%s", what, wrStacks())
		}
		if spins < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(100 * time.Microsecond)
		}
	}
}

func wrStacks() string {
	buf := make([]byte, 4<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// wrGoroutines counts the parked goroutines whose stack contains every one
// of frames.
func wrGoroutines(frames ...string) int {
	n := 0
	for _, g := range strings.Split(wrStacks(), "\n\n") {
		header, _, _ := strings.Cut(g, "\n")
		if strings.Contains(header, "[running") || strings.Contains(header, "[runnable") {
			continue
		}
		all := true
		for _, f := range frames {
			all = all && strings.Contains(g, f)
		}
		if all {
			n++
		}
	}
	return n
}

// wrWaiting is how many goroutines wait for a sender's turn.
func wrWaiting() int { return wrGoroutines("tunnel.(*sender[...]).take") }

// wrBlockedInSend is how many goroutines holding a sender's turn are
// blocked in the outer stream's Send by gRPC's flow control.
func wrBlockedInSend() int {
	return wrGoroutines("tunnel.(*sender[...]).writeLocked", "transport.(*writeQuota).get")
}

// wrServer starts a gRPC server with a TunnelServiceHandler serving the
// flood service with opts, and returns the handler, the flood service and a
// stub dialled to it.
func wrServer(t *testing.T, opts ...TunnelOption) (*TunnelServiceHandler, *wrFlood, tunnelpb.TunnelServiceClient) {
	t.Helper()
	h := NewTunnelServiceHandler(TunnelServiceHandlerOptions{TunnelOptions: opts})
	f := &wrFlood{errs: make(chan error, 16)}
	h.RegisterService(&wrDesc, f)
	return h, f, wrServe(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, h.Service()) })
}

// wrServe starts a gRPC server on loopback with what reg registers, and
// returns a stub dialled to it; both are stopped at cleanup.
func wrServe(t *testing.T, reg func(*grpc.Server)) tunnelpb.TunnelServiceClient {
	t.Helper()
	// Fixed windows turn gRPC's bandwidth estimator off: it widens the
	// windows of a connection that receives, read or not, which would let a
	// send that blocked go on later.
	const window = 64 << 10
	srv := grpc.NewServer(grpc.InitialWindowSize(window), grpc.InitialConnWindowSize(window))
	reg(srv)
	return tunnelpb.NewTunnelServiceClient(loopback.Serve(t, srv, grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window)))
}

// wrStalledClient opens a forward tunnel as a raw network client with the
// given extensions, reads the settings, starts n flood calls (revision
// zero: nothing but the outer stream's flow control holds the handlers
// back) and from then on reads nothing.
func wrStalledClient(t *testing.T, stub tunnelpb.TunnelServiceClient, ext string, n int) (tunnelpb.TunnelService_OpenTunnelClient, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*wrPatience)
	t.Cleanup(cancel)
	md := metadata.Pairs(negotiateHeader, negotiateOn)
	if ext != "" {
		md.Set(extensionsHeader, ext)
	}
	stream, err := stub.OpenTunnel(metadata.NewOutgoingContext(ctx, md))
	if err != nil {
		t.Fatal(err)
	}
	if f, err := stream.Recv(); err != nil || f.GetSettings() == nil {
		t.Fatalf("expected settings first, got %v, %v", f, err)
	}
	for id := int64(1); id <= int64(n); id++ {
		err := stream.Send(&tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_NewStream{NewStream: &tunnelpb.NewStream{
			MethodName:       wrFloodMethod,
			ProtocolRevision: tunnelpb.ProtocolRevision_REVISION_ZERO,
		}}})
		if err != nil {
			t.Fatal(err)
		}
	}
	return stream, cancel
}

// TestWriterStalledPeerCallsEndWithTheirContexts: handlers queued behind a
// send that a peer who stopped reading has blocked return as soon as their
// calls end, with their contexts' status, while that send stays blocked;
// the end of the outer stream releases it.
func TestWriterStalledPeerCallsEndWithTheirContexts(t *testing.T) {
	const calls = 4
	_, flood, stub := wrServer(t, WithKeepalive(0, 0))
	stream, cancel := wrStalledClient(t, stub, "", calls)
	// One handler holds the turn, blocked in the outer stream's Send; the
	// others wait for it.
	wrUntil(t, "one handler blocked in Send and the others waiting for the turn", func() bool {
		return wrBlockedInSend() == 1 && wrWaiting() == calls-1
	})
	// The peer still sends: it cancels every call. The server reads the
	// cancels (its reader never blocks on the network), which cancel the
	// handlers' contexts.
	for id := int64(1); id <= calls; id++ {
		if err := stream.Send(&tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_Cancel{Cancel: emptyFrame}}); err != nil {
			t.Fatal(err)
		}
	}
	for range calls - 1 {
		if err := recvWithin(t, flood.errs, "a waiting handler to return"); status.Code(err) != codes.Canceled {
			t.Fatalf("a waiting handler's SendMsg returned %v; want Canceled, its context's status", err)
		}
	}
	if n := wrBlockedInSend(); n != 1 {
		t.Fatalf("%d goroutines blocked in Send; want the one that held the turn", n)
	}
	// Ending the outer stream releases the send gRPC has blocked.
	cancel()
	if err := recvWithin(t, flood.errs, "the blocked handler to return"); err == nil {
		t.Fatal("SendMsg succeeded on a stream that ended")
	}
	wrUntil(t, "nothing left waiting or sending", func() bool { return wrWaiting() == 0 && wrBlockedInSend() == 0 })
}

// TestWriterDeadPeerReleasedByKeepalive: a peer that stops reading and
// answers nothing, while the server's handlers fill the outer stream. The
// server's keepalive ping cannot leave (it is queued behind the blocked
// send), but the silence alone gives the tunnel up after interval plus
// timeout; the handler of the outer stream then returns, which ends the
// outer stream and releases the blocked send: every goroutine of the tunnel
// is gone, not held until the connection dies.
func TestWriterDeadPeerReleasedByKeepalive(t *testing.T) {
	const calls = 4
	const interval, timeout = 20 * time.Millisecond, 40 * time.Millisecond
	h, flood, stub := wrServer(t, WithKeepalive(interval, timeout))
	start := time.Now()
	stream, _ := wrStalledClient(t, stub, extKeepalive, calls)
	for range calls {
		if err := recvWithin(t, flood.errs, "every handler to return"); err == nil {
			t.Fatal("SendMsg succeeded with nobody reading")
		}
	}
	wrUntil(t, "the tunnel to end", func() bool {
		n := 0
		h.forwardTunnels.Range(func(any, any) bool { n++; return true })
		return n == 0
	})
	// Far more than interval+timeout, far less than never: the bound only
	// tells a release by keepalive from one by the test's cleanup.
	if elapsed := time.Since(start); elapsed > wrPatience/2 {
		t.Fatalf("released after %v with a keepalive of %v+%v", elapsed, interval, timeout)
	}
	wrUntil(t, "nothing left waiting or sending", func() bool { return wrWaiting() == 0 && wrBlockedInSend() == 0 })
	// Reading at last, the peer finds the tunnel's end and why.
	for {
		if _, err := stream.Recv(); err != nil {
			if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "keepalive") {
				t.Fatalf("tunnel ended with %v; want Unavailable from keepalive", err)
			}
			break
		}
	}
}

// wrStalledNetworkServer accepts forward tunnels, plain protocol (revision
// zero, no windows), and never reads from them.
type wrStalledNetworkServer struct {
	tunnelpb.UnimplementedTunnelServiceServer
}

func (wrStalledNetworkServer) OpenTunnel(s tunnelpb.TunnelService_OpenTunnelServer) error {
	if err := s.SendHeader(metadata.Pairs("x-wr", "1")); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// TestWriterStalledPeerClientWaiters: on a NewChannel tunnel whose network
// server stops reading, a caller blocked in the outer stream's Send holds
// the turn. A call opening behind it ends with its context's status when
// that ends; and closing the tunnel releases every waiter at once.
func TestWriterStalledPeerClientWaiters(t *testing.T) {
	stub := wrServe(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, wrStalledNetworkServer{}) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*wrPatience)
	defer cancel()
	ch, err := NewChannel(stub).Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	desc := &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}
	// Streams opened while the outer stream still takes frames.
	var streams []grpc.ClientStream
	for range 3 {
		cs, err := ch.NewStream(ctx, desc, wrFloodMethod)
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, cs)
	}
	sent := make(chan error, len(streams))
	var wg sync.WaitGroup
	defer wg.Wait()
	m := wrapperspb.Bytes(make([]byte, 1<<20))
	// The first fills the outer stream and blocks in its Send.
	wg.Go(func() {
		for {
			if err := streams[0].SendMsg(m); err != nil {
				sent <- err
				return
			}
		}
	})
	wrUntil(t, "a caller blocked in Send", func() bool { return wrBlockedInSend() == 1 })
	for _, cs := range streams[1:] {
		wg.Go(func() { sent <- cs.SendMsg(m) })
	}
	// Calls that open behind it: one cancelled, one past its deadline.
	cancelled, cancelOpen := context.WithCancel(ctx)
	opened := make(chan error, 2)
	wg.Go(func() {
		_, err := ch.NewStream(cancelled, desc, wrFloodMethod)
		opened <- err
	})
	wrUntil(t, "every later caller waiting for the turn", func() bool { return wrWaiting() == 3 })
	cancelOpen()
	wantOpen := func(code codes.Code) {
		t.Helper()
		if err := recvWithin(t, opened, "a waiting call to give up"); status.Code(err) != code {
			t.Fatalf("NewStream returned %v; want %v, its context's status", err, code)
		}
	}
	wantOpen(codes.Canceled)
	deadline, stop := context.WithTimeout(ctx, wrDeadline)
	defer stop()
	wg.Go(func() {
		err := ch.Invoke(deadline, wrFloodMethod, wrapperspb.Bytes(nil), new(wrapperspb.BytesValue))
		opened <- err
	})
	wantOpen(codes.DeadlineExceeded)
	// The tunnel's end releases the rest, the blocked Send included.
	ch.Close()
	for range streams {
		if err := recvWithin(t, sent, "a sender to return"); !errors.Is(err, io.EOF) {
			t.Fatalf("SendMsg returned %v on a closed tunnel; want io.EOF", err)
		}
	}
	for _, cs := range streams {
		if err := cs.RecvMsg(new(wrapperspb.BytesValue)); status.Code(err) != codes.Unavailable {
			t.Fatalf("RecvMsg returned %v on a closed tunnel; want Unavailable", err)
		}
	}
	wrUntil(t, "nothing left waiting or sending", func() bool { return wrWaiting() == 0 && wrBlockedInSend() == 0 })
}
