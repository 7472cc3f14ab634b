package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives the tests: run
// promises to stop everything it started, the tunnels and connections
// included.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestSecureRun runs the example and checks that its narration shows each
// step, in order: the trusted device is keyed by its certificate whatever
// its header says, and the untrusted one is refused. run waits on events
// rather than on time, so its output is the same on every run.
func TestSecureRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, &out); err != nil {
		t.Fatalf("run: %v\noutput so far:\n%s", err, out.String())
	}
	rest := out.String()
	for _, want := range []string{
		"(in production they come from your PKI)\n",
		"gateway: listening with TLS; client certificates from the device CA are required\n",
		"gateway: reverse tunnel opened; key \"device-1\" from the verified certificate (the device-id header said \"device-2\" and is ignored)\n",
		"device-1: handling GetStatus\n",
		"gateway <- device-1: served_by=device-1 state=online\n",
		"gateway -> device-2: GetStatus failed as expected: Unavailable (a header cannot claim a key)\n",
		"rogue: tunnel refused: started=false code=Unavailable\n",
		"gateway: reverse tunnels open: device-1\n",
		"gateway <- device-1: served_by=device-1 calls_served=2\n",
		"gateway: reverse tunnel of device-1 closed\n",
		"done: only the holder of device-1's certificate was reachable as device-1\n",
	} {
		i := strings.Index(rest, want)
		if i < 0 {
			t.Fatalf("output lacks %q after the lines before it; whole output:\n%s", want, out.String())
		}
		rest = rest[i+len(want):]
	}
	if strings.Contains(out.String(), "rogue: handling") {
		t.Fatalf("the rogue device served a call; whole output:\n%s", out.String())
	}
}
