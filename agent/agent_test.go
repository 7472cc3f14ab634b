package agent_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var quiet = slog.New(slog.DiscardHandler)

func TestKeyHeaderMatchesTheGateways(t *testing.T) {
	if agent.DefaultKeyHeader != gateway.DefaultKeyHeader {
		t.Fatalf("agent announces %q, gateway reads %q", agent.DefaultKeyHeader, gateway.DefaultKeyHeader)
	}
}

func TestNeedsAKey(t *testing.T) {
	if _, err := agent.New(nil, nil, agent.Options{}); err == nil {
		t.Fatal("an agent without a key was accepted")
	}
}

// TestRefusesAKeyTheGatewayNeverAccepts: a key with a comma would be
// refused on every tunnel, forever; New says so at once.
func TestRefusesAKeyTheGatewayNeverAccepts(t *testing.T) {
	_, err := agent.New(nil, nil, agent.Options{Key: "site-a,site-b"})
	if err == nil || err.Error() != `agent: the key "site-a,site-b" contains a comma` {
		t.Fatalf("New with key \"site-a,site-b\": %v, want an error saying it contains a comma", err)
	}
}

// TestForwardsAndStops runs an agent against a plain tunnel handler (the
// gateway is tested in its own package): calls through the tunnel reach
// the target with the key announced on the tunnel, and each way of
// stopping ends Run as documented.
func TestForwardsAndStops(t *testing.T) {
	target := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(target, &grpchantesting.TestServer{})
	targetConn := loopback.Serve(t, target)

	keys := make(chan string, 4)
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		AffinityKey: func(ch tunnel.TunnelChannel) any {
			md, _ := metadata.FromIncomingContext(ch.Context())
			keys <- md.Get("tunnel-key")[0]
			return nil
		},
	})
	srv := grpc.NewServer()
	tunnelpb.RegisterTunnelServiceServer(srv, handler.Service())
	gw := loopback.Serve(t, srv)

	for _, stop := range []string{"context", "GracefulStop", "Stop"} {
		t.Run(stop, func(t *testing.T) {
			a, err := agent.New(gw, targetConn, agent.Options{Key: "k1", Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ran := make(chan error, 1)
			go func() { ran <- a.Run(ctx) }()
			if err := handler.AsChannel().WaitForReady(ctx); err != nil {
				t.Fatal(err)
			}
			if k := <-keys; k != "k1" {
				t.Errorf("announced key %q", k)
			}
			grpchantesting.RunChannelTestCases(t, handler.AsChannel(), true)

			var want error
			switch stop {
			case "context":
				cancel()
				want = context.Canceled
			case "GracefulStop":
				a.GracefulStop()
			case "Stop":
				a.Stop()
			}
			if err := <-ran; !errors.Is(err, want) {
				t.Fatalf("Run returned %v, want %v", err, want)
			}
			// The next agent must not find this one's tunnel still
			// being taken down on the server's side.
			deadline := time.Now().Add(10 * time.Second)
			for len(handler.AllReverseTunnels()) > 0 {
				if time.Now().After(deadline) {
					t.Fatal("the agent's tunnel outlived Run")
				}
				runtime.Gosched()
			}
		})
	}
}

// servedGateway is a gateway serving on a listener of its own.
type servedGateway struct {
	g      *gateway.Gateway
	srv    *grpc.Server
	served chan struct{}
}

// serveGateway serves a new gateway on addr ("127.0.0.1:0" for any port).
func serveGateway(t *testing.T, addr string) (*servedGateway, string) {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(gateway.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	s := &servedGateway{g: g, srv: grpc.NewServer(g.ServerOptions()...), served: make(chan struct{})}
	g.Register(s.srv)
	go func() {
		defer close(s.served)
		_ = s.srv.Serve(lis)
	}()
	t.Cleanup(s.stop)
	return s, lis.Addr().String()
}

// drain stops the gateway as grpctunnel gateway does on SIGTERM.
func (s *servedGateway) drain() {
	s.g.Shutdown()
	s.srv.GracefulStop()
	<-s.served
}

func (s *servedGateway) stop() {
	s.srv.Stop()
	<-s.served
}

func (s *servedGateway) tunnels(key string) int {
	for _, a := range s.g.Agents() {
		if a.GetKey() == key {
			return len(a.GetTunnels())
		}
	}
	return 0
}

// TestBackAfterTheGatewayRestarts drains a gateway, lets the agent fail to
// reach its address for a while, as it would while the gateway restarts,
// then serves a new gateway there: the agent is back with all its tunnels.
// The agent dials the gateway as grpctunnel agent does, with a short idle
// timeout, so that gRPC's own connection backoff does not hold it back.
func TestBackAfterTheGatewayRestarts(t *testing.T) {
	target := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(target, &grpchantesting.TestServer{})
	targetConn := loopback.Serve(t, target)
	old, addr := serveGateway(t, "127.0.0.1:0")
	gwConn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithIdleTimeout(agent.IdleTimeout))
	if err != nil {
		t.Fatal(err)
	}
	defer gwConn.Close()

	var failures atomic.Int32
	a, err := agent.New(gwConn, targetConn, agent.Options{Key: "k1", Logger: quiet, Reconnect: tunnel.ReconnectOptions{
		Tunnels: 2,
		OnStateChange: func(c tunnel.StateChange) {
			if c.State == tunnel.TunnelWaiting && status.Code(c.Err) == codes.Unavailable {
				failures.Add(1)
			}
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- a.Run(context.Background()) }()
	defer func() {
		a.Stop()
		if err := <-ran; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitFor(t, func() bool { return old.tunnels("k1") == 2 })

	old.drain()
	// Nothing listens now: the agent's attempts fail, more than enough of
	// them for gRPC's connection backoff (a second at first) to matter.
	start := failures.Load()
	waitFor(t, func() bool { return failures.Load() >= start+10 })
	restarted, _ := serveGateway(t, addr)
	listening := time.Now()
	waitFor(t, func() bool { return restarted.tunnels("k1") == 2 })
	t.Logf("back %v after the new gateway listened", time.Since(listening))
	grpchantesting.RunChannelTestCases(t, testkit.Header{ClientConnInterface: gwConn, Key: gateway.DefaultKeyHeader, Value: "k1"}, true)
}

// waitFor polls cond until it holds; see testkit.WaitFor.
var waitFor = testkit.WaitFor
