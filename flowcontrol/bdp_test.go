package flowcontrol

import (
	"sync"
	"sync/atomic"
	"testing"
)

// TestBDPProbeStartedOnce grants from many goroutines at once, as the
// reader and the consumer of a stream may: exactly one grant starts the
// probe, and the probe's time is the one that grant read, so that a sample
// never pairs one grant's offset with another's time.
func TestBDPProbeStartedOnce(t *testing.T) {
	var clock atomic.Int64
	saved := now
	now = func() int64 { return clock.Add(1) }
	t.Cleanup(func() { now = saved })

	var b bdpEstimator
	var start, wg sync.WaitGroup
	start.Add(1)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start.Wait()
			b.granted(int64(1000 * (i + 1)))
		}()
	}
	start.Done()
	wg.Wait()
	if reads := clock.Load(); reads != 1 {
		t.Fatalf("%d grants read the clock; want only the one that started the probe", reads)
	}
	if p := b.probeAt.Load(); p <= 0 || p%1000 != 0 {
		t.Fatalf("probe offset %d; want one grant's offset", p)
	}
	if pt := b.probeTime.Load(); pt != 1 {
		t.Fatalf("probe time %d; want 1, the time its grant read", pt)
	}
	// The reader's first bytes past the probe start a sample timed from it.
	p := b.probeAt.Load()
	clock.Store(10)
	if s := b.received(p+1, 1); s != 0 || !b.sampling || b.sampleEnd != 11+(11-1) {
		t.Fatalf("after the first byte past the probe: sample %d, sampling %v, end %d; want 0, true, %d", s, b.sampling, b.sampleEnd, 11+10)
	}
}
