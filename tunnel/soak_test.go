package tunnel

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestSoak runs thousands of calls over forward and reverse tunnels, many
// cancelled at random or cut short by their deadlines, and checks that
// goroutines, heap and the tunnels' budgets come back to where they were.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test; skipped with -short")
	}
	slow := &probe{
		unary: func(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
			if d := len(in.GetValue()) % 3; d > 0 {
				select {
				case <-time.After(time.Duration(d) * time.Millisecond):
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			return in, nil
		},
	}
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(slow))
	fwd := forward(t, ts.stub).(*tunnelClient)
	reverse(t, ts.handler, ts.stub, 2, testServices(slow))
	targets := []grpc.ClientConnInterface{fwd, ts.handler.AsChannel()}

	// Warm up, then take the baseline.
	for _, cc := range targets {
		if _, err := unary(context.Background(), cc, []byte("warm")); err != nil {
			t.Fatal(err)
		}
	}
	baseGoroutines, baseHeap := soakFootprint()

	const workers, perWorker = 32, 200
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range perWorker {
				cc := targets[(w+i)%len(targets)]
				if err := soakCall(rng, cc); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	// Everything the calls held is given back: their handlers end, their
	// streams leave the tables, their bytes leave the budgets.
	waitFor(t, func() bool {
		g, _ := soakFootprint()
		return g <= baseGoroutines
	})
	var srv *tunnelServer
	ts.handler.forwardTunnels.Range(func(k, _ any) bool { srv = k.(*tunnelServer); return false })
	waitFor(t, func() bool {
		fwd.mu.Lock()
		open := len(fwd.streams)
		fwd.mu.Unlock()
		srv.mu.Lock()
		open += len(srv.streams)
		srv.mu.Unlock()
		return open == 0 && fwd.buffered.used.Load() == 0 && srv.buffered.used.Load() == 0
	})
	_, heap := soakFootprint()
	if grew := int64(heap) - int64(baseHeap); grew > 8<<20 {
		t.Fatalf("heap grew by %d bytes over %d calls", grew, workers*perWorker)
	}
}

// soakCall makes one call of a random kind, with a random deadline or a
// random cancellation, and checks it ended as one of those allows.
func soakCall(rng *rand.Rand, cc grpc.ClientConnInterface) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(1+rng.IntN(4))*time.Millisecond)
	defer cancel()
	payload := make([]byte, rng.IntN(40_000))
	var err error
	switch rng.IntN(3) {
	case 0:
		_, err = unary(ctx, cc, payload)
	case 1:
		err = soakStream(ctx, cc, payload, rng.IntN(5), nil)
	default:
		// Cancel in the middle of a stream.
		err = soakStream(ctx, cc, payload, 5, cancel)
	}
	switch status.Code(err) {
	case codes.OK, codes.Canceled, codes.DeadlineExceeded:
		return nil
	}
	return err
}

func soakStream(ctx context.Context, cc grpc.ClientConnInterface, payload []byte, n int, cancelAfterFirst context.CancelFunc) error {
	cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
	if err != nil {
		return err
	}
	for i := range n {
		if err := cs.SendMsg(bytesValue(payload)); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return err
		}
		if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
			return err
		}
		if i == 0 && cancelAfterFirst != nil {
			cancelAfterFirst()
		}
	}
	if err := cs.CloseSend(); err != nil {
		return err
	}
	for {
		if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

func soakFootprint() (goroutines int, heap uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return runtime.NumGoroutine(), ms.HeapAlloc
}
