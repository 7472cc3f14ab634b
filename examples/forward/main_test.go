package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives the tests: run
// promises to stop everything it started, the tunnel included.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var answered = regexp.MustCompile(`(?m)^client -> GetStatus, (direct|tunneled) call \d: answered by (backend-[ab]) \((.*)\)$`)

// TestRun runs the example and checks what its narration shows: direct calls
// split evenly over both backends, tunneled calls all on one. Which backend
// the tunnel lands on is the balancer's choice, so the test accepts either.
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, &out); err != nil {
		t.Fatalf("run: %v\noutput so far:\n%s", err, out.String())
	}
	got := out.String()

	direct := map[string]int{}
	tunneled := map[string]int{}
	for _, m := range answered.FindAllStringSubmatch(got, -1) {
		kind, backend, state := m[1], m[2], m[3]
		switch kind {
		case "direct":
			direct[backend]++
			if state != "serving directly" {
				t.Errorf("direct call reported %q", state)
			}
		case "tunneled":
			tunneled[backend]++
			if state != "serving through a tunnel" {
				t.Errorf("tunneled call reported %q", state)
			}
		}
	}
	if direct["backend-a"] != callsPerPhase/2 || direct["backend-b"] != callsPerPhase/2 {
		t.Errorf("direct calls per backend = %v, want %d each", direct, callsPerPhase/2)
	}
	if len(tunneled) != 1 {
		t.Fatalf("tunneled calls per backend = %v, want all on one", tunneled)
	}
	var pinned string
	for b, n := range tunneled {
		pinned = b
		if n != callsPerPhase {
			t.Errorf("%d tunneled calls, want %d", n, callsPerPhase)
		}
	}
	for _, want := range []string{
		"client: opened a forward tunnel over the same balanced connection\n",
		"client -> Tail, tunneled: received \"" + pinned + ": started\"\n",
		"summary: direct calls were spread over 2 backends; all tunneled calls stayed on " + pinned + "\n",
		"done: tunnel and connection closed\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("whole output:\n%s", got)
	}
}
