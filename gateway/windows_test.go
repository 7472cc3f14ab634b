package gateway_test

import (
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

// TestGatewaySendsCallersNoWindowProbes: a caller making calls one at a
// time through the gateway to an agent gets no PING from the gateway with
// its default, fixed windows (each would cost the call a write and a
// wake-up on both sides); with gRPC's dynamic windows it gets some.
func TestGatewaySendsCallersNoWindowProbes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size      int
		wantPings bool
	}{
		{"default", 0, false},
		{"dynamic", -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, gw := startGateway(t, gateway.Options{WindowSize: tc.size})
			startAgent(t, g, gw, startBackend(t), "site-a", 1)
			var pings testkit.PingCounter
			caller, err := grpc.NewClient("passthrough:///"+gw.Target(),
				grpc.WithContextDialer(pings.Dial), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer caller.Close()
			client := grpchantesting.NewTestServiceClient(keyed(caller, "site-a"))
			for range 20 {
				if _, err := client.Unary(t.Context(), &grpchantesting.Message{Payload: []byte("ping?")}); err != nil {
					t.Fatal(err)
				}
			}
			if got := pings.Received() > 0; got != tc.wantPings {
				t.Errorf("the gateway sent the caller %d PINGs during 20 calls; want some: %v", pings.Received(), tc.wantPings)
			}
		})
	}
}
