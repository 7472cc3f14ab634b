package workers

import (
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Tasks run; a burst starts a worker per task, of which only the bound
// stays idle afterwards; Close leaves none behind.
func TestPool(t *testing.T) {
	var mu sync.Mutex
	seen := map[int]bool{}
	release := make(chan struct{})
	started := make(chan int)
	p := New(func(n int) {
		mu.Lock()
		seen[n] = true
		mu.Unlock()
		started <- n
		<-release
	}, 2, time.Hour)
	// Five tasks at once: none can wait for another, so five workers run.
	for i := range 5 {
		p.Go(i)
	}
	for range 5 {
		<-started
	}
	close(release)
	waitIdle(t, p, 2)
	// The idle workers take later tasks.
	for i := 5; i < 10; i++ {
		p.Go(i)
		<-started
	}
	p.Close()
	if len(seen) != 10 {
		t.Fatalf("ran %d tasks, want 10", len(seen))
	}
}

// An idle worker exits after the idle time.
func TestIdleWorkersExit(t *testing.T) {
	done := make(chan struct{})
	p := New(func(struct{}) { done <- struct{}{} }, 4, time.Millisecond)
	p.Go(struct{}{})
	<-done
	p.live.Wait() // returns once the worker gave up waiting
	p.Close()
}

func waitIdle[T any](t *testing.T, p *Pool[T], n int32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.idle.Load() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle workers, want %d", p.idle.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}
