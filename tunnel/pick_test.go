package tunnel

import (
	"context"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Ready and WaitForReady are questions, not calls: asking them between
// calls must not change which tunnel the next call takes.
func TestReadyLeavesRoundRobinAlone(t *testing.T) {
	ts := startServer(t, newAffRecorder(affKey).options(), nil)
	h := ts.handler
	a := affOpen(t, h, ts.stub, "a", "k", 1)
	b := affOpen(t, h, ts.stub, "b", "k", 1)
	cc := h.KeyAsChannel("k")
	var calls []string
	for range 20 {
		if !cc.Ready() || cc.WaitForReady(context.Background()) != nil {
			t.Fatal("not ready with two tunnels open")
		}
		id, err := affCall(context.Background(), cc)
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, id)
	}
	affWantRoundRobin(t, calls, []string{a.id, b.id})
}

// holdCalls starts n streaming calls on cc that stay open until the test
// ends, and waits until they have all started.
func holdCalls(t *testing.T, cc grpc.ClientConnInterface, n int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	for range n {
		cs, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { _ = cs.RecvMsg(bytesValue(nil)) })
	}
}

// Calls go to the tunnel with the fewest in progress, and a full tunnel is
// passed over while another has room; with every tunnel full a call fails
// with ResourceExhausted, which says so.
func TestPickLeastLoadedTunnelWithRoom(t *testing.T) {
	opts := newAffRecorder(affKey).options()
	opts.TunnelOptions = []TunnelOption{WithMaxConcurrentStreams(3)}
	ts := startServer(t, opts, nil)
	h := ts.handler
	x := affOpen(t, h, ts.stub, "x", "k", 1)
	y := affOpen(t, h, ts.stub, "y", "k", 1)
	cc := h.KeyAsChannel("k")

	// Two calls held on x: the next three calls all go to y, the least
	// loaded, although round-robin alone would send one of them to x.
	holdCalls(t, x.tuns[0], 2)
	for range 3 {
		if id, err := affCall(context.Background(), cc); err != nil || id != y.id {
			t.Fatalf("call reached %q (%v); want the less loaded %q", id, err, y.id)
		}
	}
	// y full, x with one free slot: the call goes to x.
	holdCalls(t, y.tuns[0], 3)
	if id, err := affCall(context.Background(), cc); err != nil || id != x.id {
		t.Fatalf("call reached %q (%v); want %q, the only tunnel with room", id, err, x.id)
	}
	holdCalls(t, cc, 1) // x full too
	_, err := affCall(context.Background(), cc)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), `every reverse tunnel for key "k" is at its limit`) {
		t.Fatalf("every tunnel full: %v; want ResourceExhausted saying so", err)
	}
}

// A call whose tunnel turns out to be ending when the call starts has not
// left: it is tried on another tunnel of the key, transparently.
func TestCallThatNeverLeftIsRetried(t *testing.T) {
	ts := startServer(t, newAffRecorder(affKey).options(), nil)
	h := ts.handler
	dead := affOpen(t, h, ts.stub, "dead", "k", 1)
	live := affOpen(t, h, ts.stub, "live", "k", 1)
	deadT := dead.tuns[0].(*tunnelClient)

	// The tunnel ends between the pick and the call's first frame: keep it
	// in the pool and make it look usable, as it did a moment earlier.
	h.pool.remove(deadT)
	deadT.Close()
	deadT.refusing.Store(false)
	h.pool.mu.Lock()
	g := h.pool.byKey["k"]
	g.tunnels = append([]*tunnelClient{deadT}, g.tunnels...)
	g.next = len(g.tunnels) - 1 // the dead tunnel is next
	h.pool.mu.Unlock()
	t.Cleanup(func() { h.pool.remove(deadT) })

	cc := h.KeyAsChannel("k")
	for _, call := range []func() (string, error){
		func() (string, error) { return affCall(context.Background(), cc) },
		func() (string, error) {
			cs, err := cc.NewStream(context.Background(), &grpc.StreamDesc{ServerStreams: true}, probeStream)
			if err != nil {
				return "", err
			}
			if err := cs.CloseSend(); err != nil {
				return "", err
			}
			out := bytesValue(nil)
			err = cs.RecvMsg(out)
			return string(out.GetValue()), err
		},
	} {
		h.pool.mu.Lock()
		g.next = len(g.tunnels) - 1
		h.pool.mu.Unlock()
		if id, err := call(); err != nil || id != live.id {
			t.Fatalf("call reached %q (%v); want it retried on %q", id, err, live.id)
		}
	}
	// On the tunnel itself the failure is the plain status, naming it.
	_, err := affCall(context.Background(), deadT)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `reverse tunnel from`) || !strings.Contains(err.Error(), `(key "k") closed`) {
		t.Fatalf("call on the closed tunnel: %v", err)
	}
}
