package proxy

import (
	"sync"
	"time"

	"google.golang.org/grpc"
)

// FakeClock is a clock for ConnCache tests: time moves only when Advance
// says, and the timers due then run in Advance, so that a test knows the
// idle sweep has run when Advance returns.
type FakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c       *FakeClock
	at      time.Time
	f       func()
	stopped bool
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := !t.stopped
	t.stopped = true
	return was
}

func NewFakeClock() *FakeClock { return &FakeClock{now: time.Unix(1e9, 0)} }

func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *FakeClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

// Advance moves the clock on by d and runs the timers due by then, in
// order, including any they set that are due too.
func (c *FakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		var due *fakeTimer
		for _, t := range c.timers {
			if !t.stopped && !t.at.After(c.now) && (due == nil || t.at.Before(due.at)) {
				due = t
			}
		}
		if due != nil {
			due.stopped = true
		}
		c.mu.Unlock()
		if due == nil {
			return
		}
		due.f()
	}
}

// Pending is the number of timers set and neither fired nor stopped.
func (c *FakeClock) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.timers {
		if !t.stopped {
			n++
		}
	}
	return n
}

// CacheClock makes a cache use c.
func CacheClock(c *FakeClock) ConnCacheOption {
	return func(cache *ConnCache) { cache.clock = c }
}

// Underlying is the *grpc.ClientConn behind a connection from
// ConnCache.Get.
func Underlying(c grpc.ClientConnInterface) *grpc.ClientConn { return c.(*CachedConn).conn }

// Active is the number of calls in progress on a connection from
// ConnCache.Get.
func Active(c grpc.ClientConnInterface) int {
	cc := c.(*CachedConn)
	cc.cache.mu.Lock()
	defer cc.cache.mu.Unlock()
	return cc.active
}
