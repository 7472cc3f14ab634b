package tunnel

// Hostile network clients against the tunnel server of a forward tunnel (a
// TunnelServiceHandler), played with rawTunnel; see hostile_test.go.

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

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
