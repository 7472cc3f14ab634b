package tunnel

import (
	"context"
	"errors"
	"io"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// These tests play hostile and broken peers against both ends of a tunnel,
// frame by frame: against the tunnel server (a TunnelServiceHandler driven by
// a raw network client, and a ReverseTunnelServer driven by a fake network
// server) and against the tunnel client (a NewChannel client driven by a fake
// network server, and a handler's reverse tunnel driven by a raw network
// client). Each misbehaviour must end as PROTOCOL.md's Errors table says:
// the stream or the tunnel, with a clear status; never a panic, a hang, a
// leaked goroutine (goleak runs in TestMain) or memory growing without bound,
// and never harm to another tunnel, which each test checks with a bystander.
// protocol_test.go already covers part of the tunnel server's side; what is
// there is not repeated here.

// peerDeadline bounds every tunnel these tests open, so that a library that
// hangs fails the test with DeadlineExceeded rather than stalling the run.
const peerDeadline = 30 * time.Second

// peerContext returns a context that ends at peerDeadline or when the test
// ends.
func peerContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), peerDeadline)
	t.Cleanup(cancel)
	return ctx
}

// peerWait receives from ch, failing the test if nothing arrives in time.
func peerWait[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// hosHold is a probe whose streaming handler neither reads nor sends: it
// waits until its call ends. It counts its handlers in and out, so that a
// test sees every handler a hostile peer started return. Its unary method
// echoes.
type hosHold struct{ started, exited atomic.Int64 }

func (h *hosHold) probe() *probe {
	return &probe{stream: func(ss grpc.ServerStream) error {
		h.started.Add(1)
		defer h.exited.Add(1)
		<-ss.Context().Done()
		return nil
	}}
}

// hosBystander makes a call on another tunnel of the same server: the
// hostile peer must not have harmed it.
func hosBystander(t *testing.T, cc grpc.ClientConnInterface) {
	t.Helper()
	out, err := unary(peerContext(t), cc, []byte("bystander"))
	if err != nil || string(out) != "bystander" {
		t.Fatalf("a bystander tunnel was harmed: %q, %v", out, err)
	}
}

// openRawNegotiated opens a forward tunnel by hand as openRaw does, negotiating
// revision one, and reads the settings. The tunnel ends at peerDeadline at
// the latest, so that no read can block the test for ever.
func openRawNegotiated(t *testing.T, stub tunnelpb.TunnelServiceClient, headers ...string) *rawTunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), peerDeadline)
	t.Cleanup(cancel)
	ctx = metadata.AppendToOutgoingContext(ctx, "grpctunnel-negotiate", "on")
	ctx = metadata.AppendToOutgoingContext(ctx, headers...)
	stream, err := stub.OpenTunnel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hdr, err := stream.Header()
	if err != nil {
		t.Fatal(err)
	}
	r := &rawTunnel{t: t, stream: stream, header: hdr, cancel: cancel}
	if f := r.recv(); f.GetSettings() == nil {
		t.Fatalf("first frame is not settings: %v", f)
	}
	return r
}

// rawEcho makes a well-formed unary call on a raw tunnel.
func rawEcho(t *testing.T, r *rawTunnel, id int64) {
	t.Helper()
	req := mustMarshal(t, bytesValue([]byte("still here")))
	r.send(newStreamFrame(id, probeUnary, rev1, 65536))
	r.sendMessage(id, req)
	r.send(halfCloseFrame(id))
	if msgs, st := r.readResponse(id, false); st.Code() != codes.OK || len(msgs) != 1 || string(msgs[0]) != string(req) {
		t.Fatalf("a well-formed call on the tunnel: %q, %v", msgs, st)
	}
}

// hosForwardTunnels lists the handler's forward tunnels.
func hosForwardTunnels(h *TunnelServiceHandler) []*tunnelServer {
	var out []*tunnelServer
	h.forwardTunnels.Range(func(k, _ any) bool {
		out = append(out, k.(*tunnelServer))
		return true
	})
	return out
}

// TestHostileServerStreamRules breaks the rules of one stream in ways
// protocol_test.go does not: each closes that stream with the status the
// Errors table gives, and the tunnel and a bystander tunnel carry on.
func TestHostileServerStreamRules(t *testing.T) {
	hold := &hosHold{}
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(hold.probe()))
	bystander := forward(t, ts.stub)
	r := openRawNegotiated(t, ts.stub, "grpctunnel-extensions", "binary-metadata")
	var id int64
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ClientToServer
		code   codes.Code
	}{
		// Two updates of 2^31-1: the first already takes the window past
		// 2^31-1, since the stream starts with 64 KiB.
		{"window update overflows", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), windowUpdateFrame(id, 0x7FFFFFFF), windowUpdateFrame(id, 0x7FFFFFFF)}
		}, codes.Internal},
		// The handler of probeStream never reads, so the call is still in
		// progress when the reader sees the later frames.
		{"message after half-close", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), halfCloseFrame(id), messageFrame(id, 1, []byte("x"))}
		}, codes.Internal},
		{"continuation after half-close", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), halfCloseFrame(id), moreFrame(id, []byte("x"))}
		}, codes.Internal},
		{"half-close in the middle of a message", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), messageFrame(id, 2, []byte("x")), halfCloseFrame(id)}
		}, codes.Internal},
		{"malformed binary metadata", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536, "x-bin", "!!not base64")}
		}, codes.InvalidArgument},
		{"malformed grpc-timeout", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536, "grpc-timeout", "soon")}
		}, codes.InvalidArgument},
		{"method name of a lone slash", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "/", rev1, 65536)}
		}, codes.Unimplemented},
		{"method name with a trailing slash", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary+"/", rev1, 65536)}
		}, codes.Unimplemented},
		{"method name without a service", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "/Unary", rev1, 65536)}
		}, codes.Unimplemented},
		{"unknown method of a known service", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "/grpctunnel.test.Probe/Nope", rev1, 65536)}
		}, codes.Unimplemented},
		{"message over the size limit", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), messageFrame(id, 4<<20+1, []byte("x"))}
		}, codes.ResourceExhausted},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id++
			for _, f := range c.frames(id) {
				r.send(f)
			}
			if _, st := r.readResponse(id, false); st.Code() != c.code {
				t.Fatalf("status %v; want %v", st, c.code)
			}
			hosBystander(t, bystander)
		})
	}
	t.Run("frames after cancel are ignored", func(t *testing.T) {
		// No close_stream follows a cancel, and what the peer sends after
		// it races with the end: readResponse below fails on any frame
		// for the cancelled stream.
		id++
		for _, f := range []*tunnelpb.ClientToServer{
			newStreamFrame(id, probeStream, rev1, 65536), cancelFrame(id),
			messageFrame(id, 1, []byte("x")), moreFrame(id, []byte("y")), windowUpdateFrame(id, 0x7FFFFFFF), halfCloseFrame(id), cancelFrame(id),
		} {
			r.send(f)
		}
		id++
		rawEcho(t, r, id)
	})
	id++
	rawEcho(t, r, id)
	// Every handler the cases started has returned.
	waitFor(t, func() bool { return hold.exited.Load() == hold.started.Load() })
}

// TestHostileServerTunnelRules breaks rules of the tunnel itself in ways
// protocol_test.go does not: each ends the tunnel with Internal ("protocol
// error") and a bystander tunnel is untouched.
func TestHostileServerTunnelRules(t *testing.T) {
	hold := &hosHold{}
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(hold.probe()))
	bystander := forward(t, ts.stub)
	cases := []struct {
		name    string
		headers []string
		play    func(r *rawTunnel)
	}{
		{"frame for stream 0", nil, func(r *rawTunnel) {
			r.send(windowUpdateFrame(0, 1))
		}},
		{"new_stream with ID 0", nil, func(r *rawTunnel) {
			r.send(newStreamFrame(0, probeUnary, rev1, 65536))
		}},
		{"message before new_stream", nil, func(r *rawTunnel) {
			r.send(messageFrame(1, 1, []byte("x")))
			r.send(newStreamFrame(1, probeUnary, rev1, 65536))
		}},
		{"stream ID reused after its stream ended", nil, func(r *rawTunnel) {
			rawEcho(r.t, r, 1)
			r.send(newStreamFrame(1, probeUnary, rev1, 65536))
		}},
		{"new_stream for a live stream after others", nil, func(r *rawTunnel) {
			r.send(newStreamFrame(1, probeStream, rev1, 65536))
			r.send(newStreamFrame(2, probeStream, rev1, 65536))
			r.send(newStreamFrame(1, probeStream, rev1, 65536))
		}},
		{"cancel on stream -1 without tunnel-close", nil, func(r *rawTunnel) {
			r.send(cancelFrame(-1))
		}},
		// tunnel-close lets a reverse tunnel's network server end the
		// tunnel with a cancel on -1; a forward tunnel's client has no
		// such frame.
		{"cancel on stream -1 of a forward tunnel with tunnel-close", []string{"grpctunnel-extensions", "tunnel-close"}, func(r *rawTunnel) {
			r.send(cancelFrame(-1))
		}},
		{"frame of no known type on stream -1", nil, func(r *rawTunnel) {
			r.send(&tunnelpb.ClientToServer{StreamId: -1})
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := openRawNegotiated(t, ts.stub, c.headers...)
			c.play(r)
			for {
				_, err := r.stream.Recv()
				if err == nil {
					continue // a close_stream for a refused stream, say
				}
				if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "protocol error") {
					t.Fatalf("tunnel ended with %v; want Internal protocol error", err)
				}
				break
			}
			hosBystander(t, bystander)
		})
	}
	waitFor(t, func() bool { return hold.exited.Load() == hold.started.Load() })
}

// TestHostileServerStreamsNeverFinish plays a peer that opens calls and
// never finishes them: beyond WithMaxConcurrentStreams they are refused with
// ResourceExhausted, and when the peer's tunnel goes away every handler it
// started ends.
func TestHostileServerStreamsNeverFinish(t *testing.T) {
	hold := &hosHold{}
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithMaxConcurrentStreams(3)}}, testServices(hold.probe()))
	r := openRawNegotiated(t, ts.stub)
	bystander := forward(t, ts.stub)
	for id := int64(1); id <= 3; id++ {
		r.send(newStreamFrame(id, probeStream, rev1, 65536))
	}
	waitFor(t, func() bool { return hold.started.Load() == 3 })
	r.send(newStreamFrame(4, probeStream, rev1, 65536))
	if _, st := r.readResponse(4, false); st.Code() != codes.ResourceExhausted {
		t.Fatalf("call beyond the limit: %v; want ResourceExhausted", st)
	}
	// The limit is per tunnel: the bystander's calls still go through.
	hosBystander(t, bystander)
	r.cancel()
	waitFor(t, func() bool { return hold.exited.Load() == 3 })
	waitFor(t, func() bool { return len(hosForwardTunnels(ts.handler)) == 1 })
	hosBystander(t, bystander)
}

// hosQueued is how many frames wait in a sender's queue.
func hosQueued[F any](s *sender[F]) int {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	return len(s.queue)
}

// hosMaxQueued is the bound PROTOCOL.md sets on the frames an end queues for
// a peer that does not read them (Go's HTTP/2 server draws the same line).
const hosMaxQueued = 10000

// hosFlood sends frames with send, up to count or the first error, and
// reports the outcome on the returned channel.
func hosFlood(count int, send func(i int) error) chan error {
	sent := make(chan error, 1)
	go func() {
		for i := 1; i <= count; i++ {
			if err := send(i); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	return sent
}

// hosWatchQueue watches what an end queues for a peer that floods it and
// never reads: the queue never holds more than hosMaxQueued frames, and the
// end gives the tunnel up (done closes) long before a flood of many more
// frames than that is over.
func hosWatchQueue(t *testing.T, queued func() int, done <-chan struct{}) {
	t.Helper()
	waitFor(t, func() bool {
		if n := queued(); n > hosMaxQueued {
			t.Fatalf("%d frames queued for a peer that does not read", n)
		}
		select {
		case <-done:
			return true
		default:
			return false
		}
	})
}

// TestHostileServerPeerNeverReads plays a network client that sends and never
// reads, each of its frames calling for an answer that the tunnel server
// queues (its reader must never block on the network): a refusal for each
// new_stream it cannot take, a pong for each keepalive ping. What the server
// holds for that peer stays bounded: past the bound the peer loses its tunnel
// with ResourceExhausted, and other tunnels carry on.
func TestHostileServerPeerNeverReads(t *testing.T) {
	const frames = 60000
	for _, c := range []struct {
		name    string
		headers []string
		frame   func(i int) *tunnelpb.ClientToServer
	}{
		{"refused streams", nil, func(i int) *tunnelpb.ClientToServer {
			return newStreamFrame(int64(i), "/no.Such/Method", rev1, 65536)
		}},
		{"keepalive pings", []string{"grpctunnel-extensions", "keepalive"}, func(int) *tunnelpb.ClientToServer {
			return windowUpdateFrame(-1, pingBit|1)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
			r := openRawNegotiated(t, ts.stub, c.headers...) // the last frame this peer reads, for now
			srv := hosForwardTunnels(ts.handler)[0]
			bystander := forward(t, ts.stub)
			sent := hosFlood(frames, func(i int) error { return r.stream.Send(c.frame(i)) })
			t.Cleanup(func() {
				r.cancel() // unblocks the sends, if the server stopped reading
				<-sent
			})
			hosWatchQueue(t, func() int { return hosQueued(srv.out) }, srv.done)
			wantCode(t, srv.err, codes.ResourceExhausted)
			// The network client, reading at last, gets the answers that
			// had left and then the tunnel's status.
			for {
				if _, err := r.stream.Recv(); err != nil {
					wantCode(t, err, codes.ResourceExhausted)
					break
				}
			}
			hosBystander(t, bystander)
		})
	}
}

// fakeNet is a fake network server that hands each tunnel-opening RPC to the
// test, which then plays the network server's end frame by frame.
type fakeNet struct {
	stub tunnelpb.TunnelServiceClient
	fwd  chan *fakeConn
	rev  chan *fakeConn
}

// fakeConn is one opening RPC held by the fake: fwd or rev is set. Sending
// on end makes the RPC return that error.
type fakeConn struct {
	fwd tunnelpb.TunnelService_OpenTunnelServer
	rev tunnelpb.TunnelService_OpenReverseTunnelServer
	end chan error
}

func startFakeNet(t *testing.T) *fakeNet {
	n := &fakeNet{fwd: make(chan *fakeConn), rev: make(chan *fakeConn)}
	n.stub = startFake(t, &fakeNetworkServer{
		forward: func(s tunnelpb.TunnelService_OpenTunnelServer) error {
			return n.hand(s.Context(), &fakeConn{fwd: s, end: make(chan error, 1)}, n.fwd)
		},
		reverse: func(s tunnelpb.TunnelService_OpenReverseTunnelServer) error {
			return n.hand(s.Context(), &fakeConn{rev: s, end: make(chan error, 1)}, n.rev)
		},
	})
	return n
}

func (n *fakeNet) hand(ctx context.Context, c *fakeConn, to chan *fakeConn) error {
	select {
	case to <- c:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-c.end:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fakeOpening is the network server's response headers: negotiation on
// unless negotiate is false, and ext as the accepted extensions.
func fakeOpening(negotiate bool, ext string) metadata.MD {
	md := metadata.Pairs("x-hos", "1") // never empty: no headers is a refusal
	if negotiate {
		md.Set("grpctunnel-negotiate", "on")
	}
	if ext != "" {
		md.Set("grpctunnel-extensions", ext)
	}
	return md
}

// openChannel starts a NewChannel tunnel over stub, which must lead to n,
// and plays the network server's opening: headers, then settings if
// negotiated. It returns the channel and the network server's end.
func (n *fakeNet) openChannel(t *testing.T, stub tunnelpb.TunnelServiceClient, negotiate bool, ext string, opts ...TunnelOption) (TunnelChannel, *fakeConn) {
	t.Helper()
	type started struct {
		ch  TunnelChannel
		err error
	}
	res := make(chan started, 1)
	ctx := peerContext(t)
	go func() {
		ch, err := NewChannel(stub, opts...).Start(ctx)
		res <- started{ch, err}
	}()
	c := peerWait(t, n.fwd, "the tunnel-opening RPC")
	if err := c.fwd.SendHeader(fakeOpening(negotiate, ext)); err != nil {
		t.Fatal(err)
	}
	if negotiate {
		if err := c.fwd.Send(serverSettingsFrame(-1, 65536, tunnelpb.ProtocolRevision_REVISION_ZERO, rev1)); err != nil {
			t.Fatal(err)
		}
	}
	s := peerWait(t, res, "the channel to start")
	if s.err != nil {
		t.Fatal(s.err)
	}
	t.Cleanup(s.ch.Close)
	return s.ch, c
}

// recvFwd reads the tunnel client's next frame on a forward tunnel.
func (c *fakeConn) recvFwd(t *testing.T) *tunnelpb.ClientToServer {
	t.Helper()
	f, err := c.fwd.Recv()
	if err != nil {
		t.Fatalf("network server's recv: %v", err)
	}
	return f
}

func (c *fakeConn) sendFwd(t *testing.T, frames ...*tunnelpb.ServerToClient) {
	t.Helper()
	for _, f := range frames {
		if err := c.fwd.Send(f); err != nil {
			t.Fatalf("network server's send: %v", err)
		}
	}
}

// readUnary reads the frames of one unary call from the tunnel client (its
// new_stream, request and half-close) and returns the stream ID and the
// request.
func (c *fakeConn) readUnary(t *testing.T) (int64, []byte) {
	t.Helper()
	f := c.recvFwd(t)
	if f.GetNewStream() == nil {
		t.Fatalf("expected a new_stream, got %v", f)
	}
	id := f.GetStreamId()
	m := c.recvFwd(t)
	if m.GetStreamId() != id || m.GetRequestMessage() == nil || int(m.GetRequestMessage().GetSize()) != len(m.GetRequestMessage().GetData()) {
		t.Fatalf("expected the whole request of stream %d, got %v", id, m)
	}
	if h := c.recvFwd(t); h.GetStreamId() != id || h.GetHalfClose() == nil {
		t.Fatalf("expected the half-close of stream %d, got %v", id, h)
	}
	return id, m.GetRequestMessage().GetData()
}

// backgroundUnary runs a unary call in the background; its error arrives on the
// returned channel.
func backgroundUnary(ctx context.Context, cc grpc.ClientConnInterface, in []byte) <-chan error {
	errc := make(chan error, 1)
	go func() {
		_, err := unary(ctx, cc, in)
		errc <- err
	}()
	return errc
}

// fakeEcho makes a call on ch and answers it as a well-behaved server would.
func fakeEcho(t *testing.T, ch TunnelChannel, c *fakeConn) {
	t.Helper()
	out := make(chan []byte, 1)
	errc := make(chan error, 1)
	ctx := peerContext(t)
	go func() {
		b, err := unary(ctx, ch, []byte("echo"))
		out <- b
		errc <- err
	}()
	id, req := c.readUnary(t)
	c.sendFwd(t, responseFrame(id, uint32(len(req)), req), closeCodeFrame(id, codes.OK, nil))
	if err := peerWait(t, errc, "the echo call"); err != nil {
		t.Fatalf("a well-formed call on the tunnel: %v", err)
	}
	if b := <-out; string(b) != "echo" {
		t.Fatalf("echo returned %q", b)
	}
}

// TestHostileClientStreamRules plays a network server that breaks the rules
// of one call toward a NewChannel client: the caller gets the status of the
// Errors table, a cancel reaches the server where the call ended on the
// client's side, and the tunnel carries on.
func TestHostileClientStreamRules(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "binary-metadata")
	whole := mustMarshal(t, bytesValue([]byte("response")))
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ServerToClient
		code   codes.Code
		cancel bool // the client tells the server the call is over
	}{
		{"chunk overruns its declared size", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("xyz"))}
		}, codes.Internal, true},
		{"continuation overruns the declared size", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("x")), moreResponseFrame(id, []byte("yz"))}
		}, codes.Internal, true},
		{"data with no message started", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{moreResponseFrame(id, []byte("x"))}
		}, codes.Internal, true},
		{"message started before the previous ended", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("x")), responseFrame(id, 2, []byte("x"))}
		}, codes.Internal, true},
		{"4 GiB message", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 0xFFFFFFFF, []byte("x"))}
		}, codes.ResourceExhausted, true},
		{"message over the size limit", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 4<<20+1, nil)}
		}, codes.ResourceExhausted, true},
		// Two updates of 2^31-1: the window starts at 64 KiB, so the
		// first already overflows.
		{"window update overflows", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverWindowUpdateFrame(id, 0x7FFFFFFF), serverWindowUpdateFrame(id, 0x7FFFFFFF)}
		}, codes.Internal, true},
		{"headers twice", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{headersFrame(id, pbMetadata("a", "1")), headersFrame(id, pbMetadata("a", "2"))}
		}, codes.Internal, true},
		{"headers after a message", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, uint32(len(whole)), whole), headersFrame(id, pbMetadata("a", "1"))}
		}, codes.Internal, true},
		{"malformed binary headers", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{headersFrame(id, pbMetadata("x-bin", "!!not base64"))}
		}, codes.InvalidArgument, true},
		{"malformed binary trailers", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, uint32(len(whole)), whole), closeCodeFrame(id, codes.OK, pbMetadata("x-bin", "!!not base64"))}
		}, codes.InvalidArgument, true},
		// The client has nothing to cancel: the server ended the call.
		{"unary call closed without a response", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{closeCodeFrame(id, codes.OK, nil)}
		}, codes.Internal, false},
		{"two responses to a unary call", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, uint32(len(whole)), whole), responseFrame(id, uint32(len(whole)), whole)}
		}, codes.Internal, true},
		// Frames for a call that has ended race with its end: ignored.
		{"frames after the close are ignored", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{
				responseFrame(id, uint32(len(whole)), whole), closeCodeFrame(id, codes.OK, nil),
				responseFrame(id, 1, []byte("x")), moreResponseFrame(id, []byte("y")), serverWindowUpdateFrame(id, 0x7FFFFFFF), headersFrame(id, pbMetadata()), closeCodeFrame(id, codes.Internal, nil),
			}
		}, codes.OK, false},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			errc := backgroundUnary(peerContext(t), ch, []byte("request"))
			id, _ := c.readUnary(t)
			c.sendFwd(t, k.frames(id)...)
			wantCode(t, peerWait(t, errc, "the call to end"), k.code)
			if k.cancel {
				if f := c.recvFwd(t); f.GetStreamId() != id || f.GetCancel() == nil {
					t.Fatalf("expected a cancel for stream %d, got %v", id, f)
				}
			}
			// readUnary fails on any stray frame, a cancel among them.
			fakeEcho(t, ch, c)
		})
	}
	// A caller blocked for want of window is released by the end of its
	// call. (Two window updates of 2^31-1 would not do here: with no
	// credit left, the first is legal and lets the caller finish.)
	t.Run("a stream error releases a caller waiting for window", func(t *testing.T) {
		cs, err := ch.NewStream(peerContext(t), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		sent := make(chan error, 1)
		go func() { sent <- cs.SendMsg(bytesValue(make([]byte, 200_000))) }()
		f := c.recvFwd(t)
		id := f.GetStreamId()
		if f.GetNewStream() == nil {
			t.Fatalf("expected a new_stream, got %v", f)
		}
		// Read until the caller has used up its window of 64 KiB: it is
		// then blocked waiting for more.
		for got := 0; got < 65536; {
			f := c.recvFwd(t)
			got += len(f.GetRequestMessage().GetData()) + len(f.GetMoreRequestData())
		}
		c.sendFwd(t, responseFrame(id, 2, []byte("xyz")))
		if err := peerWait(t, sent, "the blocked SendMsg to return"); !errors.Is(err, io.EOF) {
			t.Fatalf("SendMsg returned %v; want io.EOF, the status coming from RecvMsg", err)
		}
		wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Internal)
		if f := c.recvFwd(t); f.GetStreamId() != id || f.GetCancel() == nil {
			t.Fatalf("expected a cancel for stream %d, got %v", id, f)
		}
		fakeEcho(t, ch, c)
	})
}

// TestHostileClientTunnelRules plays a network server that breaks rules of
// the tunnel toward a NewChannel client: the tunnel ends with Internal
// ("protocol error"), the call in progress fails with Unavailable, and a
// bystander tunnel to the same server carries on.
func TestHostileClientTunnelRules(t *testing.T) {
	n := startFakeNet(t)
	bystander, bc := n.openChannel(t, n.stub, true, "")
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ServerToClient
	}{
		{"settings again", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverSettingsFrame(-1, 65536, rev1)}
		}},
		{"settings on a stream", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverSettingsFrame(id, 65536, rev1)}
		}},
		{"frame of no known type", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{{StreamId: id}}
		}},
		{"frame for stream 0", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverWindowUpdateFrame(0, 1)}
		}},
		{"frame for a negative stream", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(-7, 1, []byte("x"))}
		}},
		{"close_stream on stream -1 without tunnel-close", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{closeCodeFrame(-1, codes.OK, nil)}
		}},
		{"frame for the next stream, not opened yet", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{headersFrame(id+1, nil)}
		}},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			ch, c := n.openChannel(t, n.stub, true, "")
			errc := backgroundUnary(peerContext(t), ch, []byte("request"))
			id, _ := c.readUnary(t)
			c.sendFwd(t, k.frames(id)...)
			wantCode(t, peerWait(t, errc, "the call to end"), codes.Unavailable)
			peerWait(t, ch.Done(), "the tunnel to end")
			if err := ch.Err(); status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "protocol error") {
				t.Fatalf("tunnel ended with %v; want Internal protocol error", err)
			}
			_, err := unary(peerContext(t), ch, nil)
			wantCode(t, err, codes.Unavailable)
			fakeEcho(t, bystander, bc)
		})
	}
	t.Run("settings with no revision in common", func(t *testing.T) {
		res := make(chan error, 1)
		ctx := peerContext(t)
		go func() {
			_, err := NewChannel(n.stub).Start(ctx)
			res <- err
		}()
		c := peerWait(t, n.fwd, "the tunnel-opening RPC")
		if err := c.fwd.SendHeader(fakeOpening(true, "")); err != nil {
			t.Fatal(err)
		}
		c.sendFwd(t, serverSettingsFrame(-1, 65536, 7, 9))
		err := peerWait(t, res, "Start to fail")
		wantCode(t, err, codes.Unavailable)
		if !strings.Contains(err.Error(), "revision") {
			t.Fatalf("unclear error: %v", err)
		}
		fakeEcho(t, bystander, bc)
	})
}

// TestHostileClientStreamsNeverFinish plays a network server that takes
// calls and never answers: calls beyond WithMaxConcurrentStreams fail at once
// with ResourceExhausted, and when the server ends the tunnel every call in
// progress ends with Unavailable.
func TestHostileClientStreamsNeverFinish(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "", WithMaxConcurrentStreams(2))
	ctx := peerContext(t)
	first := backgroundUnary(ctx, ch, []byte("one"))
	c.readUnary(t)
	second := backgroundUnary(ctx, ch, []byte("two"))
	c.readUnary(t)
	_, err := unary(ctx, ch, []byte("three"))
	wantCode(t, err, codes.ResourceExhausted)
	c.end <- nil
	wantCode(t, peerWait(t, first, "the first call to end"), codes.Unavailable)
	wantCode(t, peerWait(t, second, "the second call to end"), codes.Unavailable)
	peerWait(t, ch.Done(), "the tunnel to end")
}

// hosCountingStub counts the message bytes that a tunnel client's outer
// stream has accepted.
type hosCountingStub struct {
	tunnelpb.TunnelServiceClient
	sent atomic.Int64
}

func (s *hosCountingStub) OpenTunnel(ctx context.Context, opts ...grpc.CallOption) (tunnelpb.TunnelService_OpenTunnelClient, error) {
	st, err := s.TunnelServiceClient.OpenTunnel(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return &hosCountingStream{TunnelService_OpenTunnelClient: st, stub: s}, nil
}

type hosCountingStream struct {
	tunnelpb.TunnelService_OpenTunnelClient
	stub *hosCountingStub
}

func (s *hosCountingStream) Send(f *tunnelpb.ClientToServer) error {
	err := s.TunnelService_OpenTunnelClient.Send(f)
	if err == nil {
		s.stub.sent.Add(int64(len(f.GetRequestMessage().GetData()) + len(f.GetMoreRequestData())))
	}
	return err
}

// hosSendMessages sends count messages of size bytes on cs and reports on
// done how many went out and why it stopped.
func hosSendMessages(cs grpc.ClientStream, count, size int, done chan<- error, completed *atomic.Int64) {
	m := bytesValue(make([]byte, size))
	for range count {
		if err := cs.SendMsg(m); err != nil {
			done <- err
			return
		}
		completed.Add(1)
	}
	done <- nil
}

// hosParkedInSend reports whether a goroutine running hosSendMessages is
// blocked (not running, not runnable) inside the outer stream's Send.
func hosParkedInSend() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		header, _, _ := strings.Cut(g, "\n")
		if strings.Contains(g, "tunnel.hosSendMessages") && strings.Contains(g, "(*hosCountingStream).Send") &&
			!strings.Contains(header, "[running") && !strings.Contains(header, "[runnable") {
			return true
		}
	}
	return false
}

// TestHostileClientPeerNeverReads plays a forward tunnel's network server
// that stops reading after the first frame of a call while the caller sends
// much more than the peer could ever take. Under revision one the caller
// stops at the window; under revision zero at gRPC's own flow control. Either
// way what got through and what the process holds stay bounded, and the
// caller is released when its call or the tunnel ends.
func TestHostileClientPeerNeverReads(t *testing.T) {
	t.Run("revision one", func(t *testing.T) {
		n := startFakeNet(t)
		stub := &hosCountingStub{TunnelServiceClient: n.stub}
		ch, c := n.openChannel(t, stub, true, "")
		bystander, bc := n.openChannel(t, n.stub, true, "")
		ctx, cancel := context.WithCancel(peerContext(t))
		cs, err := ch.NewStream(ctx, probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		if f := c.recvFwd(t); f.GetNewStream() == nil { // the last frame read
			t.Fatalf("expected a new_stream, got %v", f)
		}
		done := make(chan error, 1)
		var completed atomic.Int64
		go hosSendMessages(cs, 64, 1<<20, done, &completed)
		st := cs.(*clientStream)
		waitFor(t, func() bool { return st.window.Available() == 0 && stub.sent.Load() == 65536 })
		// The caller took all the credit there was and waits for more:
		// not one of its 1 MiB messages is complete.
		if n := completed.Load(); n != 0 {
			t.Fatalf("%d messages of 1 MiB sent against a window of 64 KiB", n)
		}
		cancel()
		if err := peerWait(t, done, "the blocked SendMsg to return"); !errors.Is(err, io.EOF) {
			t.Fatalf("SendMsg returned %v; want io.EOF", err)
		}
		wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Canceled)
		if got := stub.sent.Load(); got != 65536 {
			t.Fatalf("%d bytes reached the outer stream against a window of 64 KiB", got)
		}
		fakeEcho(t, bystander, bc)
	})
	t.Run("revision zero", func(t *testing.T) {
		n := startFakeNet(t)
		stub := &hosCountingStub{TunnelServiceClient: n.stub}
		ch, c := n.openChannel(t, stub, false, "")
		bystander, bc := n.openChannel(t, n.stub, false, "")
		var before runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		cs, err := ch.NewStream(peerContext(t), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		if f := c.recvFwd(t); f.GetNewStream() == nil { // the last frame read
			t.Fatalf("expected a new_stream, got %v", f)
		}
		const count, size = 256, 1 << 20
		done := make(chan error, 1)
		var completed atomic.Int64
		go hosSendMessages(cs, count, size, done, &completed)
		// Without windows, nothing but the outer stream's flow control
		// holds the caller back; it must, well before 256 MiB.
		waitFor(t, func() bool {
			select {
			case err := <-done:
				t.Fatalf("all %d MiB were taken with nobody reading (%v)", count, err)
			default:
			}
			return hosParkedInSend()
		})
		var after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&after)
		grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
		t.Logf("caller blocked after %d messages, %d bytes through, heap grown by %d bytes", completed.Load(), stub.sent.Load(), grown)
		if got := stub.sent.Load(); got > 64<<20 {
			t.Fatalf("%d bytes went into the outer stream with nobody reading", got)
		}
		if grown > 96<<20 {
			t.Fatalf("heap grew by %d bytes with nobody reading", grown)
		}
		// A stalled outer stream stalls the whole revision-zero tunnel;
		// ending the tunnel releases the caller.
		ch.Close()
		if err := peerWait(t, done, "the blocked SendMsg to return"); err == nil {
			t.Fatal("SendMsg succeeded on a closed tunnel")
		}
		fakeEcho(t, bystander, bc)
	})
}

// TestHostileClientAbandonedMessages plays a network server that answers a
// server-streaming call with several responses and the end of the call, all
// at once, to a caller that reads no further after the first: its RecvMsg
// fails on a response it cannot decode, or it cancels the call. What it left
// unread must not stay charged to the tunnel's buffer budget
// (WithMaxBufferedBytes), or a peer that repeats this exhausts the budget and
// every call on the tunnel fails for want of it.
func TestHostileClientAbandonedMessages(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "")
	tc := ch.(*tunnelClient)
	first := mustMarshal(t, bytesValue([]byte("first")))
	more := mustMarshal(t, bytesValue(make([]byte, 1000)))
	for _, k := range []struct {
		name  string
		first []byte
		give  func(t *testing.T, cs grpc.ClientStream, cancel context.CancelFunc)
	}{
		{"undecodable response", []byte{0xff}, func(t *testing.T, cs grpc.ClientStream, _ context.CancelFunc) {
			wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Internal)
		}},
		{"caller cancels", first, func(t *testing.T, cs grpc.ClientStream, cancel context.CancelFunc) {
			m := new(wrapperspb.BytesValue)
			if err := cs.RecvMsg(m); err != nil || string(m.GetValue()) != "first" {
				t.Fatalf("first response: %q, %v", m.GetValue(), err)
			}
			cancel()
		}},
	} {
		t.Run(k.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(peerContext(t))
			defer cancel()
			cs, err := ch.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, probeStream)
			if err != nil {
				t.Fatal(err)
			}
			if err := cs.SendMsg(bytesValue([]byte("go"))); err != nil {
				t.Fatal(err)
			}
			id, _ := c.readUnary(t)
			c.sendFwd(t,
				responseFrame(id, uint32(len(k.first)), k.first),
				responseFrame(id, uint32(len(more)), more),
				responseFrame(id, uint32(len(more)), more),
				closeCodeFrame(id, codes.OK, nil))
			// The reader has taken every frame once the call has ended.
			peerWait(t, cs.(*clientStream).ended, "the end of the call")
			k.give(t, cs, cancel)
			if used := tc.buffered.used.Load(); used != 0 {
				t.Fatalf("%d bytes the caller will never read stay charged to the tunnel's budget", used)
			}
			fakeEcho(t, ch, c)
		})
	}
}

// TestHostileClientPeerPingsNeverReads plays a forward tunnel's network
// server that floods a NewChannel client with keepalive pings and never reads
// the pongs, which the client's reader queues: what the client holds for
// that peer stays bounded, and past the bound the tunnel ends with
// ResourceExhausted.
func TestHostileClientPeerPingsNeverReads(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "keepalive")
	bystander, bc := n.openChannel(t, n.stub, true, "keepalive")
	sent := hosFlood(60000, func(int) error { return c.fwd.Send(serverWindowUpdateFrame(-1, pingBit|1)) })
	t.Cleanup(func() {
		ch.Close() // ends the flood, if it is still going
		<-sent
	})
	tc := ch.(*tunnelClient)
	hosWatchQueue(t, func() int { return hosQueued(tc.out) }, tc.done)
	wantCode(t, ch.Err(), codes.ResourceExhausted)
	_, err := unary(peerContext(t), ch, nil)
	wantCode(t, err, codes.Unavailable)
	fakeEcho(t, bystander, bc)
}

// serveReverse starts rs.Serve, which must reach n, and plays the network
// server's opening: headers, then it reads the settings. It returns the
// network server's end and Serve's result.
func (n *fakeNet) serveReverse(t *testing.T, rs *ReverseTunnelServer, ext string) (*fakeConn, <-chan error) {
	t.Helper()
	res := make(chan error, 1)
	ctx := peerContext(t)
	go func() {
		started, err := rs.Serve(ctx)
		if !started && err == nil {
			err = errors.New("not started")
		}
		res <- err
	}()
	c := peerWait(t, n.rev, "the reverse tunnel-opening RPC")
	if err := c.rev.SendHeader(fakeOpening(true, ext)); err != nil {
		t.Fatal(err)
	}
	if f := c.recvRev(t); f.GetSettings() == nil || f.GetStreamId() != -1 {
		t.Fatalf("first frame is not settings: %v", f)
	}
	return c, res
}

func (c *fakeConn) recvRev(t *testing.T) *tunnelpb.ServerToClient {
	t.Helper()
	f, err := c.rev.Recv()
	if err != nil {
		t.Fatalf("network server's recv: %v", err)
	}
	return f
}

func (c *fakeConn) sendRev(t *testing.T, frames ...*tunnelpb.ClientToServer) {
	t.Helper()
	for _, f := range frames {
		if err := c.rev.Send(f); err != nil {
			t.Fatalf("network server's send: %v", err)
		}
	}
}

// closeOf reads from a reverse tunnel's tunnel server until the
// close_stream of stream id, failing on frames of other streams.
func (c *fakeConn) closeOf(t *testing.T, id int64) (body []byte, st *status.Status) {
	t.Helper()
	for {
		f := c.recvRev(t)
		if f.GetStreamId() != id {
			t.Fatalf("frame for stream %d while reading %d: %v", f.GetStreamId(), id, f)
		}
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ServerToClient_ResponseMessage:
			body = append(body, fr.ResponseMessage.GetData()...)
		case *tunnelpb.ServerToClient_MoreResponseData:
			body = append(body, fr.MoreResponseData...)
		case *tunnelpb.ServerToClient_CloseStream:
			return body, status.FromProto(fr.CloseStream.GetStatus())
		}
	}
}

// revEcho makes a well-formed unary call through a reverse tunnel, as its
// network server.
func (c *fakeConn) revEcho(t *testing.T, id int64) {
	t.Helper()
	req := mustMarshal(t, bytesValue([]byte("ping")))
	c.sendRev(t, newStreamFrame(id, probeUnary, rev1, 65536), messageFrame(id, uint32(len(req)), req), halfCloseFrame(id))
	if body, st := c.closeOf(t, id); st.Code() != codes.OK || string(body) != string(req) {
		t.Fatalf("a well-formed call on the reverse tunnel: %q, %v", body, st)
	}
}

// hosReverseServer returns a ReverseTunnelServer serving p, stopped at
// cleanup.
func hosReverseServer(t *testing.T, stub tunnelpb.TunnelServiceClient, p *probe, opts ...TunnelOption) *ReverseTunnelServer {
	rs := NewReverseTunnelServer(stub, opts...)
	rs.RegisterService(&probeDesc, p)
	t.Cleanup(rs.Stop)
	return rs
}

// TestHostileReverseServerStreamRules plays a reverse tunnel's network
// server (the tunnel client) that breaks the rules of one stream toward a
// ReverseTunnelServer: each stream ends with the status of the Errors table,
// and the tunnel, and another tunnel of the same server, carry on.
func TestHostileReverseServerStreamRules(t *testing.T) {
	n := startFakeNet(t)
	hold := &hosHold{}
	rs := hosReverseServer(t, n.stub, hold.probe())
	bc, _ := n.serveReverse(t, rs, "binary-metadata")
	c, _ := n.serveReverse(t, rs, "binary-metadata")
	var id, bid int64
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ClientToServer
		code   codes.Code
	}{
		{"window update overflows", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), windowUpdateFrame(id, 0x7FFFFFFF), windowUpdateFrame(id, 0x7FFFFFFF)}
		}, codes.Internal},
		{"message after half-close", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), halfCloseFrame(id), messageFrame(id, 1, []byte("x"))}
		}, codes.Internal},
		{"chunk overruns its declared size", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), messageFrame(id, 2, []byte("xyz"))}
		}, codes.Internal},
		{"data with no message started", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), moreFrame(id, []byte("x"))}
		}, codes.Internal},
		{"message started before the previous ended", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), messageFrame(id, 2, []byte("x")), messageFrame(id, 2, []byte("x"))}
		}, codes.Internal},
		{"4 GiB message", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536), messageFrame(id, 0xFFFFFFFF, []byte("x"))}
		}, codes.ResourceExhausted},
		{"window overrun", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536),
				messageFrame(id, 40000, make([]byte, 16384)), moreFrame(id, make([]byte, 16384)), moreFrame(id, make([]byte, 7232)),
				messageFrame(id, 40000, make([]byte, 16384)), moreFrame(id, make([]byte, 16384)), moreFrame(id, make([]byte, 7232))}
		}, codes.ResourceExhausted},
		{"empty method name", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "", rev1, 65536)}
		}, codes.Unimplemented},
		{"malformed method name", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "grpctunnel.test.Probe.Unary", rev1, 65536)}
		}, codes.Unimplemented},
		{"unsupported revision", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, 5, 65536)}
		}, codes.Unimplemented},
		{"malformed grpc-timeout", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536, "grpc-timeout", "12345678901S")}
		}, codes.InvalidArgument},
		{"malformed binary metadata", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeStream, rev1, 65536, "x-bin", "!!not base64")}
		}, codes.InvalidArgument},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			id++
			c.sendRev(t, k.frames(id)...)
			if _, st := c.closeOf(t, id); st.Code() != k.code {
				t.Fatalf("status %v; want %v", st, k.code)
			}
			bid++
			bc.revEcho(t, bid)
		})
	}
	id++
	c.revEcho(t, id)
	waitFor(t, func() bool { return hold.exited.Load() == hold.started.Load() })
}

// TestHostileReverseServerTunnelRules plays a reverse tunnel's network
// server that breaks rules of the tunnel toward a ReverseTunnelServer: Serve
// returns Internal ("protocol error"), and another tunnel of the same server
// carries on.
func TestHostileReverseServerTunnelRules(t *testing.T) {
	n := startFakeNet(t)
	hold := &hosHold{}
	rs := hosReverseServer(t, n.stub, hold.probe())
	bc, _ := n.serveReverse(t, rs, "")
	var bid int64
	cases := []struct {
		name   string
		frames []*tunnelpb.ClientToServer
	}{
		{"frame for a stream never opened", []*tunnelpb.ClientToServer{windowUpdateFrame(3, 1)}},
		{"message before new_stream", []*tunnelpb.ClientToServer{messageFrame(1, 1, []byte("x")), newStreamFrame(1, probeUnary, rev1, 65536)}},
		{"second new_stream for a live ID", []*tunnelpb.ClientToServer{newStreamFrame(1, probeStream, rev1, 65536), newStreamFrame(1, probeStream, rev1, 65536)}},
		{"stream ID goes down", []*tunnelpb.ClientToServer{newStreamFrame(5, probeStream, rev1, 65536), newStreamFrame(4, probeStream, rev1, 65536)}},
		{"frame for stream 0", []*tunnelpb.ClientToServer{halfCloseFrame(0)}},
		{"frame of no known type", []*tunnelpb.ClientToServer{newStreamFrame(1, probeStream, rev1, 65536), {StreamId: 1}}},
		{"cancel on stream -1 without tunnel-close", []*tunnelpb.ClientToServer{cancelFrame(-1)}},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			c, res := n.serveReverse(t, rs, "")
			for _, f := range k.frames {
				_ = c.rev.Send(f) // the tunnel may be gone already
			}
			err := peerWait(t, res, "Serve to return")
			if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "protocol error") {
				t.Fatalf("Serve returned %v; want Internal protocol error", err)
			}
			bid++
			bc.revEcho(t, bid)
		})
	}
	waitFor(t, func() bool { return hold.exited.Load() == hold.started.Load() })
}

// TestHostileReverseServerStreamsNeverFinish plays a reverse tunnel's
// network server that opens calls on a ReverseTunnelServer and never
// finishes them: beyond WithMaxConcurrentStreams they are refused with
// ResourceExhausted, and when the network server ends the tunnel every
// handler ends and Serve returns.
func TestHostileReverseServerStreamsNeverFinish(t *testing.T) {
	n := startFakeNet(t)
	hold := &hosHold{}
	rs := hosReverseServer(t, n.stub, hold.probe(), WithMaxConcurrentStreams(2))
	bc, _ := n.serveReverse(t, rs, "")
	c, res := n.serveReverse(t, rs, "")
	c.sendRev(t, newStreamFrame(1, probeStream, rev1, 65536), newStreamFrame(2, probeStream, rev1, 65536))
	waitFor(t, func() bool { return hold.started.Load() == 2 })
	c.sendRev(t, newStreamFrame(3, probeStream, rev1, 65536))
	if _, st := c.closeOf(t, 3); st.Code() != codes.ResourceExhausted {
		t.Fatalf("call beyond the limit: %v; want ResourceExhausted", st)
	}
	bc.revEcho(t, 1)
	c.end <- nil
	if err := peerWait(t, res, "Serve to return"); err != nil {
		t.Fatalf("Serve returned %v after the network server ended the tunnel", err)
	}
	waitFor(t, func() bool { return hold.exited.Load() == 2 })
	bc.revEcho(t, 2)
}

// hosReverseStream finds the stream with ID id among rs's tunnels.
func hosReverseStream(rs *ReverseTunnelServer, id int64) *serverStream {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for call := range rs.calls {
		if call.t == nil {
			continue
		}
		call.t.mu.Lock()
		st := call.t.streams[id]
		call.t.mu.Unlock()
		if st != nil {
			return st
		}
	}
	return nil
}

// TestHostileReverseServerPeerNeverReads plays a reverse tunnel's network
// server that asks a ReverseTunnelServer's handler for far more than it
// reads: the handler stops at the window, and a cancel releases it.
func TestHostileReverseServerPeerNeverReads(t *testing.T) {
	n := startFakeNet(t)
	var sent atomic.Int64
	exited := make(chan error, 1)
	p := &probe{stream: func(ss grpc.ServerStream) error {
		m := bytesValue(make([]byte, 32<<10))
		for {
			if err := ss.SendMsg(m); err != nil {
				exited <- err
				return err
			}
			sent.Add(1)
		}
	}}
	rs := hosReverseServer(t, n.stub, p)
	bc, _ := n.serveReverse(t, rs, "")
	c, _ := n.serveReverse(t, rs, "")
	c.sendRev(t, newStreamFrame(1, probeStream, rev1, 65536))
	// The network server reads nothing more from here on.
	var st *serverStream
	waitFor(t, func() bool {
		st = hosReverseStream(rs, 1)
		return st != nil && st.window.Available() == 0
	})
	// Each message is 32 KiB plus a few bytes of encoding: the window of
	// 64 KiB holds one and most of a second.
	if got := sent.Load(); got > 2 {
		t.Fatalf("the handler sent %d messages of 32 KiB against a window of 64 KiB", got)
	}
	bc.revEcho(t, 1)
	c.sendRev(t, cancelFrame(1))
	wantCode(t, peerWait(t, exited, "the blocked handler to return"), codes.Canceled)
	bc.revEcho(t, 2)
}

// TestHostileReverseTunnelClient plays a reverse tunnel's network client (the
// tunnel server) that misbehaves toward a TunnelServiceHandler's reverse
// tunnel, the tunnel client's other incarnation: stream rules end the call
// with a cancel to the peer, tunnel rules end the tunnel, and the handler's
// other reverse tunnel carries on.
func TestHostileReverseTunnelClient(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{AffinityKey: func(ch TunnelChannel) any {
		md, _ := metadata.FromIncomingContext(ch.Context())
		if v := md.Get("hos-key"); len(v) > 0 {
			return v[0]
		}
		return ""
	}}, nil)
	reverseCtx(t, metadata.AppendToOutgoingContext(context.Background(), "hos-key", "good"), ts.handler, ts.stub, 1, testServices(echoProbe()))
	good := ts.handler.KeyAsChannel("good")

	ctx := metadata.AppendToOutgoingContext(peerContext(t), "hos-key", "bad", "grpctunnel-negotiate", "on")
	raw, err := ts.stub.OpenReverseTunnel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Header(); err != nil {
		t.Fatal(err)
	}
	if err := raw.Send(serverSettingsFrame(-1, 65536, rev1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 2 })
	bad := ts.handler.KeyAsChannel("bad")
	recv := func() *tunnelpb.ClientToServer {
		t.Helper()
		f, err := raw.Recv()
		if err != nil {
			t.Fatalf("network client's recv: %v", err)
		}
		return f
	}
	readUnary := func() int64 {
		t.Helper()
		f := recv()
		id := f.GetStreamId()
		if f.GetNewStream() == nil || recv().GetRequestMessage() == nil || recv().GetHalfClose() == nil {
			t.Fatalf("expected a unary call's frames, starting with %v", f)
		}
		return id
	}
	for _, k := range []struct {
		name   string
		frames func(id int64) []*tunnelpb.ServerToClient
		code   codes.Code
	}{
		{"chunk overruns its declared size", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("xyz"))}
		}, codes.Internal},
		{"window update overflows", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverWindowUpdateFrame(id, 0x7FFFFFFF), serverWindowUpdateFrame(id, 0x7FFFFFFF)}
		}, codes.Internal},
		{"4 GiB message", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 0xFFFFFFFF, nil)}
		}, codes.ResourceExhausted},
	} {
		t.Run(k.name, func(t *testing.T) {
			errc := backgroundUnary(peerContext(t), bad, nil)
			id := readUnary()
			for _, f := range k.frames(id) {
				if err := raw.Send(f); err != nil {
					t.Fatal(err)
				}
			}
			wantCode(t, peerWait(t, errc, "the call to end"), k.code)
			if f := recv(); f.GetStreamId() != id || f.GetCancel() == nil {
				t.Fatalf("expected a cancel for stream %d, got %v", id, f)
			}
			hosBystander(t, good)
		})
	}
	t.Run("settings again", func(t *testing.T) {
		errc := backgroundUnary(peerContext(t), bad, nil)
		readUnary()
		if err := raw.Send(serverSettingsFrame(-1, 65536, rev1)); err != nil {
			t.Fatal(err)
		}
		wantCode(t, peerWait(t, errc, "the call to end"), codes.Unavailable)
		for {
			if _, err := raw.Recv(); err != nil {
				if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "protocol error") {
					t.Fatalf("tunnel ended with %v; want Internal protocol error", err)
				}
				break
			}
		}
		waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 1 })
		hosBystander(t, good)
	})
}
