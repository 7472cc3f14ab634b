package gateway_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// dial opens another client connection to the server conn reaches: another
// caller, or another agent's own connection.
func dial(t *testing.T, conn *grpc.ClientConn) *grpc.ClientConn {
	t.Helper()
	c, err := grpc.NewClient(conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// startedPerTunnel returns how many calls each of key's tunnels started,
// and how many each agent's connection (its peer address) started.
func startedPerTunnel(g *gateway.Gateway, key string) (perTunnel []uint64, perPeer map[string]uint64) {
	perPeer = map[string]uint64{}
	for _, a := range g.Agents() {
		if a.GetKey() != key {
			continue
		}
		for _, tun := range a.GetTunnels() {
			perTunnel = append(perTunnel, tun.GetStreamsStarted())
			perPeer[tun.GetPeer()] += tun.GetStreamsStarted()
		}
	}
	return perTunnel, perPeer
}

// openStreams is how many calls the gateway has in progress on key's
// tunnels.
func openStreams(g *gateway.Gateway, key string) int64 {
	var n int64
	for _, a := range g.Agents() {
		if a.GetKey() == key {
			for _, tun := range a.GetTunnels() {
				n += tun.GetOpenStreams()
			}
		}
	}
	return n
}

// Two agents share a key with two tunnels each: consecutive calls go
// round-robin over all four tunnels, so each agent gets half.
func TestCallsSpreadOverEveryTunnelOfAKey(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	startAgent(t, g, dial(t, gw), startBackend(t), "shared", 2)
	startAgent(t, g, dial(t, gw), startBackend(t), "shared", 2)
	client := grpchantesting.NewTestServiceClient(keyed(gw, "shared"))
	for range 400 {
		if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
			t.Fatal(err)
		}
	}
	perTunnel, perPeer := startedPerTunnel(g, "shared")
	if len(perTunnel) != 4 || len(perPeer) != 2 {
		t.Fatalf("want 4 tunnels from 2 agents, got %v over %v", perTunnel, perPeer)
	}
	for _, n := range perTunnel {
		if n != 100 {
			t.Errorf("calls per tunnel: %v, want 100 each", perTunnel)
			break
		}
	}
}

// holdStreams opens n bidirectional calls through conn to key and keeps
// them open until the test ends. It does not wait for them to reach the
// agent.
func holdStreams(t *testing.T, conn grpc.ClientConnInterface, key string, n int) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	client := grpchantesting.NewTestServiceClient(keyed(conn, key))
	for range n {
		wg.Go(func() {
			stream, err := client.BidiStream(ctx)
			if err != nil {
				return
			}
			_, _ = stream.Recv() // until the test cancels it
		})
	}
}

// A call lands on a tunnel with room while another of the key's tunnels is
// full, and only when every tunnel is full does a call fail, saying so.
func TestFullTunnelIsPassedOver(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{
		Tunnel: tunnel.TunnelServiceHandlerOptions{
			TunnelOptions: []tunnel.TunnelOption{tunnel.WithMaxConcurrentStreams(4)},
		},
	})
	startAgent(t, g, gw, startBackend(t), "small", 2)
	holdStreams(t, gw, "small", 8)
	waitFor(t, func() bool { return openStreams(g, "small") == 8 })

	_, err := grpchantesting.NewTestServiceClient(keyed(gw, "small")).Unary(context.Background(), &grpchantesting.Message{})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "every reverse tunnel") {
		t.Errorf("a call with both tunnels full: %v; want ResourceExhausted saying every tunnel is full", err)
	}
}

// One caller connection holding many idle calls takes at most its share of
// an agent: calls from other callers of the same agent still go through.
func TestOneCallerCannotStarveAnAgent(t *testing.T) {
	const perConn, perTunnel = 6, 10
	g, gw := startGateway(t, gateway.Options{
		MaxStreamsPerConnection: perConn,
		Tunnel: tunnel.TunnelServiceHandlerOptions{
			TunnelOptions: []tunnel.TunnelOption{tunnel.WithMaxConcurrentStreams(perTunnel)},
		},
	})
	startAgent(t, g, gw, startBackend(t), "busy", 2)

	greedy := dial(t, gw)
	holdStreams(t, greedy, "busy", 50)
	waitFor(t, func() bool { return openStreams(g, "busy") == perConn })

	// Two other callers, each with as many calls at once as it may have.
	var wg sync.WaitGroup
	errs := make(chan error, 2*perConn)
	for range 2 {
		client := grpchantesting.NewTestServiceClient(keyed(dial(t, gw), "busy"))
		for range perConn {
			wg.Go(func() {
				for range 5 {
					if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
						errs <- err
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("another caller's call failed: %v", err)
	}
	if n := openStreams(g, "busy"); n != perConn {
		t.Errorf("the greedy caller holds %d calls, want %d", n, perConn)
	}
}
