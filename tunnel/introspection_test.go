package tunnel

import (
	"context"
	"io"
	"net"
	"slices"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// exerciseInfo makes a unary call and a streaming call of known sizes
// through cc and checks what client (the calling end's Info) and server (the
// handling end's) report, before, during and after.
func exerciseInfo(t *testing.T, cc grpc.ClientConnInterface, client, server func() TunnelInfo) {
	t.Helper()
	ctx := context.Background()
	if c, s := client(), server(); c.OpenStreams != 0 || s.OpenStreams != 0 || c.BytesSent != 0 || s.BytesSent != 0 {
		t.Fatalf("fresh tunnel reports activity: client %v, server %v", c, s)
	}

	unaryReq := bytesValue(make([]byte, 1000))
	if err := cc.Invoke(ctx, probeUnary, unaryReq, new(wrapperspb.BytesValue)); err != nil {
		t.Fatal(err)
	}

	streamReq := bytesValue(make([]byte, 300<<10)) // more than one chunk
	cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.SendMsg(streamReq); err != nil {
		t.Fatal(err)
	}
	if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
		t.Fatal(err)
	}
	// The echo came back, so both ends hold the stream open.
	if n := client().OpenStreams; n != 1 {
		t.Errorf("client OpenStreams = %d during the stream, want 1", n)
	}
	if n := server().OpenStreams; n != 1 {
		t.Errorf("server OpenStreams = %d during the stream, want 1", n)
	}
	if err := cs.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
		t.Fatalf("end of stream: %v, want io.EOF", err)
	}
	waitFor(t, func() bool { return client().OpenStreams == 0 && server().OpenStreams == 0 })

	// Each request was echoed, so both directions carried the same bytes.
	want := uint64(proto.Size(unaryReq) + proto.Size(streamReq))
	waitFor(t, func() bool {
		c, s := client(), server()
		return c.BytesReceived == want && s.BytesReceived == want
	})
	c, s := client(), server()
	if c.BytesSent != want || s.BytesSent != want {
		t.Errorf("bytes sent: client %d, server %d, want %d each", c.BytesSent, s.BytesSent, want)
	}
	if c.StreamsStarted != 2 || s.StreamsStarted != 2 {
		t.Errorf("streams started: client %d, server %d, want 2 each", c.StreamsStarted, s.StreamsStarted)
	}
	if !c.Client || s.Client {
		t.Errorf("Client: client end %t, server end %t", c.Client, s.Client)
	}
	for _, i := range []TunnelInfo{c, s} {
		addr, ok := i.Peer.(*net.TCPAddr)
		if !ok || !addr.IP.IsLoopback() {
			t.Errorf("Peer = %v, want a loopback TCP address", i.Peer)
		}
		if i.OpenedAt.IsZero() || i.Draining || i.Closed {
			t.Errorf("open tunnel reports %v", i)
		}
	}
}

// wantProtocol checks the revision and extensions an Info reports.
func wantProtocol(t *testing.T, i TunnelInfo, rev int, ext []string) {
	t.Helper()
	if i.Revision != rev || !slices.Equal(i.Extensions, ext) {
		t.Errorf("revision %d, extensions %q; want %d, %q", i.Revision, i.Extensions, rev, ext)
	}
}

var allExtensions = []string{"binary-metadata", "max-chunk=262144", "tunnel-close", "keepalive", "compression", "drain"}

func TestInfoForward(t *testing.T) {
	for _, mode := range []struct {
		name string
		opts []TunnelOption
		rev  int
		ext  []string
	}{
		{"flow-control", nil, 1, allExtensions},
		{"no-flow-control", []TunnelOption{WithDisableFlowControl()}, 0, allExtensions},
		{"plain", []TunnelOption{WithPlainProtocol()}, 1, nil},
		{"plain-no-flow-control", []TunnelOption{WithPlainProtocol(), WithDisableFlowControl()}, 0, nil},
	} {
		t.Run(mode.name, func(t *testing.T) {
			ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: mode.opts}, testServices(&probe{}))
			ch := forward(t, ts.stub, mode.opts...)
			server := func() TunnelInfo {
				all := ts.handler.Tunnels()
				if len(all) != 1 {
					t.Fatalf("handler reports %d tunnels, want 1", len(all))
				}
				return all[0]
			}
			exerciseInfo(t, ch, ch.Info, server)
			for _, i := range []TunnelInfo{ch.Info(), server()} {
				if i.Reverse || i.AffinityKey != nil {
					t.Errorf("forward tunnel reports reverse %t, key %v", i.Reverse, i.AffinityKey)
				}
				wantProtocol(t, i, mode.rev, mode.ext)
			}
		})
	}
}

func TestInfoReverse(t *testing.T) {
	for _, mode := range []struct {
		name string
		opts []TunnelOption
		rev  int
		ext  []string
	}{
		{"flow-control", nil, 1, allExtensions},
		{"plain-no-flow-control", []TunnelOption{WithPlainProtocol(), WithDisableFlowControl()}, 0, nil},
	} {
		t.Run(mode.name, func(t *testing.T) {
			ts := startServer(t, TunnelServiceHandlerOptions{
				TunnelOptions: mode.opts,
				AffinityKey:   func(TunnelChannel) any { return "device-7" },
			}, nil)
			rs := reverse(t, ts.handler, ts.stub, 1, testServices(&probe{}), mode.opts...)
			ch := ts.handler.AllReverseTunnels()[0]
			// The handler may pool the tunnel a moment before the
			// reverse server records it (without tunnel-close nothing
			// orders the two).
			waitFor(t, func() bool { return len(rs.Tunnels()) == 1 })
			server := func() TunnelInfo {
				all := rs.Tunnels()
				if len(all) != 1 {
					t.Fatalf("reverse server reports %d tunnels, want 1", len(all))
				}
				return all[0]
			}
			exerciseInfo(t, ch, ch.Info, server)
			c, s := ch.Info(), server()
			if !c.Reverse || !s.Reverse {
				t.Errorf("reverse tunnel reports Reverse %t (handler), %t (reverse server)", c.Reverse, s.Reverse)
			}
			if c.AffinityKey != "device-7" || s.AffinityKey != nil {
				t.Errorf("affinity keys: handler %v, reverse server %v; want device-7, nil", c.AffinityKey, s.AffinityKey)
			}
			wantProtocol(t, c, mode.rev, mode.ext)
			wantProtocol(t, s, mode.rev, mode.ext)
			if all := ts.handler.Tunnels(); len(all) != 1 || all[0].AffinityKey != "device-7" || !all[0].Reverse {
				t.Errorf("handler snapshot %v, want the one reverse tunnel", all)
			}
		})
	}
}

// TestHandlerTunnels checks that a handler's snapshot lists its forward and
// reverse tunnels, each labelled, and forgets each once it ends.
func TestHandlerTunnels(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(nil))
	if n := len(ts.handler.Tunnels()); n != 0 {
		t.Fatalf("new handler reports %d tunnels", n)
	}
	ch := forward(t, ts.stub)
	rs := reverse(t, ts.handler, ts.stub, 1, testServices(nil))
	waitFor(t, func() bool { return len(ts.handler.Tunnels()) == 2 })
	all := ts.handler.Tunnels()
	if all[0].Reverse || all[0].Client || !all[1].Reverse || !all[1].Client {
		t.Errorf("snapshot, oldest first, is not forward then reverse: %v", all)
	}
	if !all[0].OpenedAt.Before(all[1].OpenedAt) && !all[0].OpenedAt.Equal(all[1].OpenedAt) {
		t.Errorf("snapshot not oldest first: %v", all)
	}
	waitFor(t, func() bool { return len(rs.Tunnels()) == 1 })

	ch.Close()
	<-ch.Done()
	if i := ch.Info(); !i.Closed || !i.Draining {
		t.Errorf("closed channel reports %v", i)
	}
	waitFor(t, func() bool {
		all := ts.handler.Tunnels()
		return len(all) == 1 && all[0].Reverse
	})
	rs.Stop()
	if n := len(rs.Tunnels()); n != 0 {
		t.Errorf("stopped reverse server reports %d tunnels", n)
	}
	waitFor(t, func() bool { return len(ts.handler.Tunnels()) == 0 })
}
