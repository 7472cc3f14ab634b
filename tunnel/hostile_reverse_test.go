package tunnel

// Hostile peers on reverse tunnels: a network server (the tunnel client)
// against a ReverseTunnelServer, played with fakeNet, and a network client
// (the tunnel server) against a handler's reverse tunnel client; see
// hostile_test.go.

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// TestHostileReverseServerStreamRules plays a reverse tunnel's network
// server (the tunnel client) that breaks the rules of one stream toward a
// ReverseTunnelServer: each stream ends with the status of the Errors table,
// and the tunnel, and another tunnel of the same server, carry on.
func TestHostileReverseServerStreamRules(t *testing.T) {
	n := startFakeNet(t)
	hold := &hosHold{}
	rs := peerReverseServer(t, n.stub, hold.probe())
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
	rs := peerReverseServer(t, n.stub, hold.probe())
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
			err := recvWithin(t, res, "Serve to return")
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
	rs := peerReverseServer(t, n.stub, hold.probe(), WithMaxConcurrentStreams(2))
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
	if err := recvWithin(t, res, "Serve to return"); err != nil {
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
	rs := peerReverseServer(t, n.stub, p)
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
	wantCode(t, recvWithin(t, exited, "the blocked handler to return"), codes.Canceled)
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
			wantCode(t, recvWithin(t, errc, "the call to end"), k.code)
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
		wantCode(t, recvWithin(t, errc, "the call to end"), codes.Unavailable)
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
