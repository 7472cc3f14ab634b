package main

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
)

// TestRollingAgentRestart runs the gateway and two agents of one key as
// separate processes and stops one agent with SIGTERM while callers keep
// calling: the agent tells the gateway it drains, the gateway sends new
// calls to the other agent, and no call fails.
func TestRollingAgentRestart(t *testing.T) {
	bin := buildCommand(t)
	ctx := testContext(t)
	target := startTarget(t, "rolling-device")
	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json")
	addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	agentArgs := []string{"agent", "--gateway", addr, "--key", "site", "--target", target, "--log-format", "json"}
	leaving := startProcess(t, "leaving agent", bin, agentArgs...)
	conn := dial(t, addr, insecure.NewCredentials())
	waitAgent(t, ctx, conn, "site", 1)
	staying := startProcess(t, "staying agent", bin, agentArgs...)
	waitAgent(t, ctx, conn, "site", 2)

	client := demopb.NewDeviceServiceClient(conn)
	callCtx := metadata.AppendToOutgoingContext(ctx, "tunnel-key", "site")
	var (
		halt  atomic.Bool
		calls atomic.Int64
		mu    sync.Mutex
		errs  []error
		wg    sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for !halt.Load() {
				if _, err := client.GetStatus(callCtx, &demopb.GetStatusRequest{}); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
				calls.Add(1)
			}
		})
	}
	waitCalls(t, ctx, &calls, 50)
	leaving.terminate(t) // drains, then exits 0
	after := calls.Load()
	waitCalls(t, ctx, &calls, after+50)
	halt.Store(true)
	wg.Wait()
	for _, err := range errs {
		t.Errorf("a call failed while an agent restarted: %v", err)
	}
	staying.terminate(t)
	gw.terminate(t)
}

// waitCalls waits until calls reaches n, or ctx ends the test.
func waitCalls(t *testing.T, ctx context.Context, calls *atomic.Int64, n int64) {
	t.Helper()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for calls.Load() < n {
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("%d calls made, waiting for %d", calls.Load(), n)
		}
	}
}
