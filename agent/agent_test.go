package agent_test

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
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
