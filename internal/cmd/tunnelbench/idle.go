package main

import (
	"context"
	"fmt"
	"runtime"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// The idle measurements answer what it costs to keep things open that do
// nothing: a server holding thousands of reverse tunnels from devices, or a
// tunnel holding many quiet streams. Both ends live in this process, so
// every figure counts both ends.
//
// Memory is the live heap, HeapAlloc read right after a forced collection,
// before and after opening n things, divided by n. It leaves out memory the
// runtime holds but does not use (HeapInuse would count half-empty spans),
// so it is the steadier measure of what the things themselves keep alive.

// idleCost is what one idle thing costs, both ends together.
type idleCost struct {
	heapBytes  float64 // live heap (HeapAlloc after a GC)
	goroutines float64
}

// footprint is the process's live heap and goroutine count at one moment.
type footprint struct {
	heap       uint64
	goroutines int
}

// settleTimeout bounds the wait for the goroutine count to stop moving.
const settleTimeout = 5 * time.Second

// measureFootprint waits for the goroutine count to settle, then collects
// garbage and reads the heap.
func measureFootprint() footprint {
	settle()
	runtime.GC()
	runtime.GC() // a second cycle empties sync.Pool victim caches and frees what finalizers released
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return footprint{heap: ms.HeapAlloc, goroutines: runtime.NumGoroutine()}
}

// settle waits until the goroutine count has been steady for a while (or
// settleTimeout has passed), as goroutines of things just opened or closed
// start and end a little after the calls that caused them return.
func settle() {
	const steadyFor = 10 // polls, 10 ms apart
	n, steady := runtime.NumGoroutine(), 0
	for deadline := time.Now().Add(settleTimeout); steady < steadyFor && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		if m := runtime.NumGoroutine(); m == n {
			steady++
		} else {
			n, steady = m, 0
		}
	}
}

// costPer is what each of n things opened between before and f costs.
func (f footprint) costPer(before footprint, n int) idleCost {
	return idleCost{
		heapBytes:  (float64(f.heap) - float64(before.heap)) / float64(n),
		goroutines: float64(f.goroutines-before.goroutines) / float64(n),
	}
}

// idleStreams measures n idle Idle streams through t on one connection:
// for direct, plain gRPC streams, which is also what each tunnel is built
// on; for the tunnels, streams inside one tunnel.
func idleStreams(ctx context.Context, t target, n int) (idleCost, error) {
	b, err := startBed(0)
	if err != nil {
		return idleCost{}, err
	}
	defer b.close()
	cc, err := b.connect(ctx, t)
	if err != nil {
		return idleCost{}, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the streams

	// One stream opened and closed first, so that what is built once per
	// connection or tunnel is in place before the first reading.
	warmCtx, warmCancel := context.WithCancel(ctx)
	_, err = openIdle(warmCtx, cc)
	warmCancel()
	if err != nil {
		return idleCost{}, fmt.Errorf("warm-up stream: %w", err)
	}

	streams := make([]grpc.ClientStream, 0, n)
	before := measureFootprint()
	for range n {
		cs, err := openIdle(ctx, cc)
		if err != nil {
			return idleCost{}, fmt.Errorf("opening idle stream %d of %d: %w", len(streams)+1, n, err)
		}
		streams = append(streams, cs)
	}
	after := measureFootprint()
	runtime.KeepAlive(streams)
	return after.costPer(before, n), nil
}

// idleTunnels measures n idle tunnels of kind t (forward or reverse) on one
// connection. For reverse tunnels the count includes the goroutine that
// calls ReverseTunnelServer.Serve for each, since Serve blocks for the
// tunnel's life and every application needs one.
func idleTunnels(ctx context.Context, t target, n int) (idleCost, error) {
	b, err := startBed(0)
	if err != nil {
		return idleCost{}, err
	}
	defer b.close()
	conn, err := b.dial()
	if err != nil {
		return idleCost{}, err
	}
	switch t {
	case forward, plainForward:
		return idleForwardTunnels(ctx, b, conn, n, t)
	case reverse:
		return idleReverseTunnels(ctx, b, conn, n)
	}
	return idleCost{}, fmt.Errorf("no idle tunnels for %v", t)
}

func idleForwardTunnels(ctx context.Context, b *bed, conn *grpc.ClientConn, n int, t target) (idleCost, error) {
	// One tunnel with one call first, so that the connection and whatever
	// gets built once are in place before the first reading.
	warm, err := b.openForward(ctx, conn, t)
	if err != nil {
		return idleCost{}, err
	}
	err = echo(ctx, warm, wrapperspb.Bytes(nil))
	warm.Close()
	if err != nil {
		return idleCost{}, fmt.Errorf("warm-up call: %w", err)
	}

	stub := tunnelpb.NewTunnelServiceClient(conn)
	tunnels := make([]tunnel.TunnelChannel, 0, n)
	defer func() {
		for _, ch := range tunnels {
			ch.Close()
		}
	}()
	before := measureFootprint()
	for range n {
		ch, err := tunnel.NewChannel(stub, forwardOptions(t)...).Start(ctx)
		if err != nil {
			return idleCost{}, fmt.Errorf("opening forward tunnel %d of %d: %w", len(tunnels)+1, n, err)
		}
		tunnels = append(tunnels, ch)
	}
	after := measureFootprint()
	return after.costPer(before, n), nil
}

func idleReverseTunnels(ctx context.Context, b *bed, conn *grpc.ClientConn, n int) (idleCost, error) {
	// One tunnel with one call first, as for forward tunnels.
	stop, err := b.serveReverse(ctx, conn, 1)
	if err != nil {
		return idleCost{}, err
	}
	err = echo(ctx, b.handler.AsChannel(), wrapperspb.Bytes(nil))
	stop()
	if err != nil {
		return idleCost{}, fmt.Errorf("warm-up call: %w", err)
	}
	if err := waitNoReverseTunnels(ctx, b.handler); err != nil {
		return idleCost{}, err
	}

	before := measureFootprint()
	stop, err = b.serveReverse(ctx, conn, n)
	if err != nil {
		return idleCost{}, err
	}
	after := measureFootprint()
	stop()
	return after.costPer(before, n), nil
}

// waitNoReverseTunnels waits until h has forgotten every reverse tunnel, so
// that one about to be counted is not mistaken for one that is closing.
func waitNoReverseTunnels(ctx context.Context, h *tunnel.TunnelServiceHandler) error {
	ctx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	for len(h.AllReverseTunnels()) > 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for reverse tunnels to close: %w", ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}
