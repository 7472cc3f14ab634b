package main

import (
	"context"
	"net"
	"strings"
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
