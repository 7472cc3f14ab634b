package tunnel

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// TestKeepaliveAnsweredPingsKeepTheTunnel plays a client that answers the
// server's pings: the tunnel stays up across several of them.
func TestKeepaliveAnsweredPingsKeepTheTunnel(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithKeepalive(10*time.Millisecond, 200*time.Millisecond)}}, testServices(echoProbe()))
	r := openRaw(t, ts.stub, true, "grpctunnel-extensions", "keepalive")
	r.recv() // settings
	for pings := 0; pings < 5; {
		f := r.recv()
		v := f.GetWindowUpdate()
		if f.GetStreamId() != -1 || v&pingBit == 0 {
			t.Fatalf("expected a ping, got %v", f)
		}
		pings++
		r.send(windowUpdateFrame(-1, v&^pingBit))
	}
	r.send(newStreamFrame(1, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, 65536))
	r.sendMessage(1, nil)
	r.send(halfCloseFrame(1))
	for {
		f := r.recv()
		if f.GetStreamId() == -1 {
			// Another ping: answered too, so that a slow machine cannot
			// make the silence outlast the timeout before the answer.
			if v := f.GetWindowUpdate(); v&pingBit != 0 {
				r.send(windowUpdateFrame(-1, v&^pingBit))
			}
			continue
		}
		if cs := f.GetCloseStream(); cs != nil {
			if cs.GetStatus().GetCode() != 0 {
				t.Fatalf("call after pings: %v", cs)
			}
			return
		}
	}
}

// TestKeepaliveSilentClient plays a client that announces keepalive and then
// says nothing: the server gives the tunnel up with Unavailable.
func TestKeepaliveSilentClient(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithKeepalive(10*time.Millisecond, 30*time.Millisecond)}}, testServices(echoProbe()))
	r := openRaw(t, ts.stub, true, "grpctunnel-extensions", "keepalive")
	for {
		_, err := r.stream.Recv()
		if err == nil {
			continue // settings and pings
		}
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "keepalive") {
			t.Fatalf("tunnel ended with %v; want Unavailable from keepalive", err)
		}
		return
	}
}

// TestKeepaliveSilentClientWithTunnelClose: as TestKeepaliveSilentClient,
// with the tunnel-close extension too, which would let the server read on
// its handler's goroutine: it must not, since that goroutine would then stay
// blocked on the silent client. The server ends the outer stream itself.
func TestKeepaliveSilentClientWithTunnelClose(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithKeepalive(10*time.Millisecond, 30*time.Millisecond)}}, testServices(echoProbe()))
	r := openRaw(t, ts.stub, true, "grpctunnel-extensions", "keepalive,tunnel-close")
	for {
		f, err := r.stream.Recv()
		if err == nil {
			if f.GetStreamId() == settingsStreamID && f.GetCloseStream() != nil {
				t.Fatal("the server asked the silent client to close the tunnel, which it never will")
			}
			continue // settings and pings
		}
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "keepalive") {
			t.Fatalf("tunnel ended with %v; want Unavailable from keepalive", err)
		}
		return
	}
}

// TestKeepaliveSilentServer plays a network server that accepts a reverse
// tunnel, reads its settings and then neither reads nor answers: the
// ReverseTunnelServer gives it up and Serve returns.
func TestKeepaliveSilentServer(t *testing.T) {
	stub := startFake(t, &fakeNetworkServer{reverse: func(s tunnelpb.TunnelService_OpenReverseTunnelServer) error {
		if err := s.SendHeader(metadata.Pairs("grpctunnel-negotiate", "on", "grpctunnel-extensions", "keepalive")); err != nil {
			return err
		}
		if _, err := s.Recv(); err != nil { // settings
			return err
		}
		<-s.Context().Done()
		return nil
	}})
	rs := NewReverseTunnelServer(stub, WithKeepalive(10*time.Millisecond, 30*time.Millisecond))
	rs.RegisterService(&probeDesc, echoProbe())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	started, err := rs.Serve(ctx)
	if !started || status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "keepalive") {
		t.Fatalf("Serve = %v, %v; want started and Unavailable from keepalive", started, err)
	}
}

// TestKeepaliveBetweenPeers runs calls over tunnels whose ends ping each
// other often: answering is automatic and nothing breaks.
func TestKeepaliveBetweenPeers(t *testing.T) {
	opts := []TunnelOption{WithKeepalive(time.Millisecond, time.Second)}
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: opts}, testServices(echoProbe()))
	ch := forward(t, ts.stub, opts...)
	reverse(t, ts.handler, ts.stub, 1, testServices(echoProbe()), opts...)
	for range 50 {
		if _, err := unary(context.Background(), ch, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := unary(context.Background(), ts.handler.AsChannel(), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
}
