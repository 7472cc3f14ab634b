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
// promises to stop everything it started, the tunnels included.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestRun runs the example and checks that its narration shows each step,
// in order. run waits on events rather than on time, so its output is the
// same on every run.
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, &out); err != nil {
		t.Fatalf("run: %v\noutput so far:\n%s", err, out.String())
	}
	rest := out.String()
	for _, want := range []string{
		"server: device-1 opened a reverse tunnel\n",
		"device-1: handling GetStatus\n",
		"server <- device-1: served_by=device-1 state=online calls_served=1\n",
		"device-1: handling Tail, sending 3 lines\n",
		"server <- device-1: log \"net: connected via NAT gateway\"\n",
		"server <- device-1: log \"sensor: temperature 21.7C\"\n",
		"device-1: handling Notify: \"firmware 2.1 is available\"\n",
		"server <- device-1: served_by=device-1 accepted=true\n",
		"server -> device-2: GetStatus failed as expected: Unavailable\n",
		"server: reverse tunnel from device-1 closed\n",
		"done: the server reached device-1 3 times without ever dialling it\n",
	} {
		i := strings.Index(rest, want)
		if i < 0 {
			t.Fatalf("output lacks %q after the lines before it; whole output:\n%s", want, out.String())
		}
		rest = rest[i+len(want):]
	}
}
