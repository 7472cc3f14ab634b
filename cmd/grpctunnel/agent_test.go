package main

import (
	"context"
	"net"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// TestUnreachableGateway: an agent whose gateway is down keeps trying; the
// first failure is an error that names the address and the cause, the
// later ones are warnings.
func TestUnreachableGateway(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close() // nothing listens there now
	ctx := testContext(t)
	ag := startAgentCmd(t, "--gateway", addr, "--key", "k", "--target", "127.0.0.1:1")

	var errors, warnings []map[string]any
	for len(warnings) < 3 {
		recs, changed := ag.stderr.records()
		errors, warnings = nil, nil
		for _, r := range recs {
			switch r["level"] {
			case "ERROR":
				errors = append(errors, r)
			case "WARN":
				warnings = append(warnings, r)
			}
		}
		if len(warnings) >= 3 {
			break
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("fewer than 3 failed attempts before %v; log:\n%s", ctx.Err(), ag.stderr.String())
		}
	}
	if len(errors) != 1 {
		t.Fatalf("%d errors after %d failed attempts, want 1; log:\n%s", len(errors), len(warnings), ag.stderr.String())
	}
	msg, _ := errors[0]["msg"].(string)
	cause, _ := errors[0]["err"].(string)
	if !strings.HasPrefix(msg, "cannot reach the gateway at "+addr+";") || !strings.Contains(cause, "Unavailable") {
		t.Errorf("the first failure was logged as %q, err %q", msg, cause)
	}
	stopAll(t, ag)
}

// TestDrainTimeout: a call that never ends holds neither the gateway nor
// the agent past --drain-timeout; both cut it and exit 0.
func TestDrainTimeout(t *testing.T) {
	target := startTarget(t, "sensor")
	for _, stopping := range []string{"gateway", "agent"} {
		t.Run(stopping, func(t *testing.T) {
			ctx := testContext(t)
			drain := []string{"--drain-timeout", "300ms"}
			var gwArgs, agArgs []string
			if stopping == "gateway" {
				gwArgs = drain
			} else {
				agArgs = drain
			}
			gw, addr := startGatewayCmd(t, gwArgs...)
			ag := startAgentCmd(t, append([]string{"--gateway", addr, "--key", "k", "--target", target}, agArgs...)...)
			conn := dial(t, addr, insecure.NewCredentials())
			waitAgent(t, ctx, conn, "k", 1)

			// A health Watch lasts until the caller ends it: a call in
			// progress, through the gateway and the agent, that no drain
			// can wait out.
			watchCtx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "k"))
			defer cancel()
			watch, err := healthpb.NewHealthClient(conn).Watch(watchCtx, &healthpb.HealthCheckRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("Watch: %v, %v", resp, err)
			}

			first, second := gw, ag
			if stopping == "agent" {
				first, second = ag, gw
			}
			start := time.Now()
			if code := first.stop(t); code != 0 {
				t.Errorf("the %s exited %d; log:\n%s", stopping, code, first.stderr.String())
			}
			if d := time.Since(start); d < 300*time.Millisecond {
				t.Errorf("the %s stopped after %v, before its drain timeout, with a call in progress", stopping, d)
			}
			first.stderr.waitMsg(t, ctx, "drain cut short: closed the calls still in progress")
			if _, err := watch.Recv(); err == nil {
				t.Error("the Watch went on after the drain was cut short")
			}
			cancel()
			stopAll(t, second)
		})
	}
}

// TestBackAfterTheGatewayRestarts stops the gateway, lets the agent fail
// to reach it for a few seconds, then starts a gateway on the same address:
// the agent is back with all its tunnels within a fraction of a second,
// without waiting out gRPC's own connection backoff (see
// agent.IdleTimeout), which would by then have grown to seconds.
func TestBackAfterTheGatewayRestarts(t *testing.T) {
	ctx := testContext(t)
	gw, addr := startGatewayCmd(t)
	ag := startAgentCmd(t, "--gateway", addr, "--key", "k", "--target", "127.0.0.1:1", "--tunnels", "2")
	waitAgent(t, ctx, dial(t, addr, insecure.NewCredentials()), "k", 2)

	if code := gw.stop(t); code != 0 {
		t.Fatalf("the gateway exited %d; log:\n%s", code, gw.stderr.String())
	}
	// gRPC's backoff starts at a second and grows 1.6 times a failure: let
	// the agent fail for three seconds, by its own log.
	failed := func(r map[string]any) bool { return r["msg"] == "tunnel failed; retrying" }
	first := logTime(t, ag.stderr.waitRecord(t, ctx, "of a failed attempt", failed))
	ag.stderr.waitRecord(t, ctx, "of a failed attempt 3s after the first", func(r map[string]any) bool {
		return failed(r) && logTime(t, r).Sub(first) >= 3*time.Second
	})
	restarted, _ := startGatewayCmd(t, "--listen", addr)
	listening := time.Now()
	waitAgent(t, ctx, dial(t, addr, insecure.NewCredentials()), "k", 2)
	back := time.Since(listening)
	t.Logf("back %v after the new gateway listened", back)
	// The agent tries again within 400ms; the rest is slack for a slow
	// machine. gRPC's backoff would hold it back for one to three seconds.
	if back > 1500*time.Millisecond {
		t.Errorf("the agent was back %v after the new gateway listened", back)
	}
	ag.stderr.waitMsg(t, ctx, "reached the gateway at "+addr)
	stopAll(t, ag, restarted)
}

// logTime is the time of a JSON log record.
func logTime(t *testing.T, r map[string]any) time.Time {
	t.Helper()
	s, _ := r["time"].(string)
	tm, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("log record without a time: %v", r)
	}
	return tm
}

// TestHungPeersAreNoticed stops one end of a tunnel with SIGSTOP, as a
// process that hangs, and checks that the other end gives the tunnel up
// within the --keepalive-interval and --keepalive-timeout it was given,
// far sooner than the defaults would.
func TestHungPeersAreNoticed(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops a process with SIGSTOP")
	}
	bin := buildCommand(t)
	keepalive := []string{"--keepalive-interval", "200ms", "--keepalive-timeout", "300ms"}
	givenUp := func(msg string) func(map[string]any) bool {
		return func(r map[string]any) bool {
			err, _ := r["err"].(string)
			return r["msg"] == msg && strings.Contains(err, "keepalive")
		}
	}
	const soon = 10 * time.Second // the defaults take 30s

	t.Run("agent", func(t *testing.T) {
		ctx := testContext(t)
		gw, addr := startGatewayCmd(t, keepalive...)
		ag := startProcess(t, "agent", bin, append([]string{"agent", "--gateway", addr, "--key", "k", "--target", "127.0.0.1:1", "--log-format", "json", "--tunnels", "1"}, keepalive...)...)
		waitAgent(t, ctx, dial(t, addr, insecure.NewCredentials()), "k", 1)

		resume := hang(t, ag)
		start := time.Now()
		gw.stderr.waitRecord(t, ctx, "of the agent's tunnel given up by keepalive", givenUp("agent tunnel closed"))
		if d := time.Since(start); d > soon {
			t.Errorf("the gateway gave the hung agent up after %v", d)
		}
		resume()
		ag.terminate(t)
		stopAll(t, gw)
	})
	t.Run("gateway", func(t *testing.T) {
		ctx := testContext(t)
		gw := startProcess(t, "gateway", bin, append([]string{"gateway", "--listen", "127.0.0.1:0", "--log-format", "json"}, keepalive...)...)
		addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
		ag := startAgentCmd(t, append([]string{"--gateway", addr, "--key", "k", "--target", "127.0.0.1:1"}, keepalive...)...)
		ag.stderr.waitMsg(t, ctx, "tunnel open")

		resume := hang(t, gw)
		start := time.Now()
		ag.stderr.waitRecord(t, ctx, "of the tunnel given up by keepalive", givenUp("tunnel failed; retrying"))
		if d := time.Since(start); d > soon {
			t.Errorf("the agent gave the hung gateway up after %v", d)
		}
		resume()
		gw.terminate(t)
		stopAll(t, ag)
	})
}

// hang stops p with SIGSTOP and returns what lets it run again; the test's
// end does that too, so that p can be killed.
func hang(t *testing.T, p *process) (resume func()) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resume = sync.OnceFunc(func() {
		if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Errorf("resuming the %s: %v", p.name, err)
		}
	})
	t.Cleanup(resume)
	return resume
}
