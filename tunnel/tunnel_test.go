package tunnel

import (
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitFor polls cond until it holds; see testkit.WaitFor.
var waitFor = testkit.WaitFor

// TestChannelCases runs grpchan's shared channel test cases over every
// topology, with and without flow control, and against an end that speaks
// only the plain protocol (no extensions).
func TestChannelCases(t *testing.T) {
	modes := []struct {
		name string
		opts []TunnelOption
	}{
		{"flow-control", nil},
		{"no-flow-control", []TunnelOption{WithDisableFlowControl()}},
		{"plain", []TunnelOption{WithPlainProtocol()}},
	}
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			for _, tr := range transports {
				t.Run(tr.name, func(t *testing.T) {
					ch := tr.dial(t, testServices(nil), mode.opts)
					grpchantesting.RunChannelTestCases(t, ch, true)
				})
			}
		})
	}
}

// TestRevisionNegotiated checks which revision each combination of ends
// settles on: revision one only when neither end disables flow control,
// including for tunnels opened through another tunnel.
func TestRevisionNegotiated(t *testing.T) {
	cases := []struct {
		name            string
		server, client  []TunnelOption
		wantFlowControl bool
	}{
		{"both default", nil, nil, true},
		{"client disables", nil, []TunnelOption{WithDisableFlowControl()}, false},
		{"server disables", []TunnelOption{WithDisableFlowControl()}, nil, false},
		{"plain peers", []TunnelOption{WithPlainProtocol()}, []TunnelOption{WithPlainProtocol()}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: c.server}, testServices(nil))
			ch := forward(t, ts.stub, c.client...).(*tunnelClient)
			if ch.flowControl != c.wantFlowControl {
				t.Fatalf("flow control %v; want %v", ch.flowControl, c.wantFlowControl)
			}
			wantChunk := defaultMaxChunk
			if c.name == "plain peers" {
				wantChunk = 16384
			}
			if ch.agreed.maxChunk != wantChunk {
				t.Fatalf("chunk size %d; want %d", ch.agreed.maxChunk, wantChunk)
			}
		})
	}
	t.Run("nested", func(t *testing.T) {
		inner := NewTunnelServiceHandler(TunnelServiceHandlerOptions{})
		testServices(nil)(inner)
		ts := startServer(t, TunnelServiceHandlerOptions{}, func(r grpc.ServiceRegistrar) {
			tunnelpb.RegisterTunnelServiceServer(r, inner.Service())
		})
		outer := forward(t, ts.stub)
		nested := forward(t, tunnelpb.NewTunnelServiceClient(outer)).(*tunnelClient)
		if !nested.flowControl || !nested.agreed.binaryMetadata {
			t.Fatalf("nested tunnel agreed %+v, flow control %v", nested.agreed, nested.flowControl)
		}
	})
}

// TestMixedPeers runs the channel cases between this package and an end
// that speaks only the plain protocol, in both directions.
func TestMixedPeers(t *testing.T) {
	plain := []TunnelOption{WithPlainProtocol()}
	for _, c := range []struct {
		name           string
		server, client []TunnelOption
	}{
		{"plain server", plain, nil},
		{"plain client", nil, plain},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Run("forward", func(t *testing.T) {
				ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: c.server}, testServices(nil))
				grpchantesting.RunChannelTestCases(t, forward(t, ts.stub, c.client...), true)
			})
			t.Run("reverse", func(t *testing.T) {
				ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: c.server}, nil)
				reverse(t, ts.handler, ts.stub, 1, testServices(nil), c.client...)
				grpchantesting.RunChannelTestCases(t, ts.handler.AsChannel(), true)
			})
		})
	}
}
