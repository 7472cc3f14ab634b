package tunnel

import (
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitFor polls cond until it holds, failing the test after a generous
// deadline. Tests wait on conditions, never on guessed sleeps.
func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestChannelCases(t *testing.T) {
	for _, mode := range []struct {
		name string
		opts []TunnelOption
	}{
		{"flow-control", nil},
		{"no-flow-control", []TunnelOption{WithDisableFlowControl()}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			t.Run("forward", func(t *testing.T) {
				ts := startServer(t, TunnelServiceHandlerOptions{})
				grpchantesting.RunChannelTestCases(t, ts.forward(t, mode.opts...), true)
			})
			t.Run("reverse", func(t *testing.T) {
				ts := startServer(t, TunnelServiceHandlerOptions{})
				ts.reverse(t, 1, mode.opts...)
				grpchantesting.RunChannelTestCases(t, ts.handler.AsChannel(), true)
			})
		})
	}
}
