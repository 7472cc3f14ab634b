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
		{"plain", []TunnelOption{withPlainProtocol()}},
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
