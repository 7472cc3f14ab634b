package flowcontrol

import (
	"sync/atomic"
	"time"
)

// RecvWindow is a receiver's account of one stream direction: what it granted
// the peer, what arrived, and what the application consumed. The tunnel's
// reader goroutine calls Receive and BeginMessage; the consuming goroutine
// calls Consume. They share only atomics.
//
// Offsets are cumulative byte counts since the stream began, so a grant is
// simply "you may send up to offset X" and never wraps in practice.
type RecvWindow struct {
	limit    atomic.Int64 // target window: granted stays about consumed+limit
	granted  atomic.Int64 // offset the peer may send up to
	received atomic.Int64 // offset received so far
	consumed atomic.Int64 // offset consumed by the application

	// Autotuning, off while ceiling is zero; set before use.
	floor    int64         // the limit to return to when idle
	ceiling  int64         // the largest limit growth may reach
	idle     time.Duration // how long without consumption counts as idle
	lastUsed atomic.Int64  // monotonic nanoseconds of the last Consume
	bdp      bdpEstimator
	hint     *Hint
}

// epoch anchors the monotonic clock used for idle detection.
var epoch = time.Now()

// AutoTune lets the window grow on its own, up to ceiling, when it is what
// holds the stream back, as on a link with a long round trip where a fixed
// window caps a stream at window/RTT. The receiver estimates the
// bandwidth-delay product as grpc-go's transport does, with window updates
// standing in for HTTP/2 pings (see bdpEstimator): when about a whole window
// arrives within one round trip, the window is too small and is doubled.
// After idle without consumption the limit falls back to where it started,
// so a quiet stream does not keep a large allowance.
//
// A non-nil hint shares what was learned between the streams of one
// tunnel: a window starts, and restarts after idle, from the size recent
// streams grew to, rather than learning the link again from the initial
// size, and growth here is passed on.
//
// Call it before the window is shared between goroutines.
func (w *RecvWindow) AutoTune(ceiling uint32, idle time.Duration, hint *Hint) {
	w.floor = w.limit.Load()
	w.ceiling = max(int64(min(ceiling, MaxWindow)), w.floor)
	w.idle = idle
	w.hint = hint
	w.lastUsed.Store(now())
	w.limit.Store(w.startLimit())
}

// startLimit is the limit a window starts from, and returns to after idle:
// what the tunnel learned recently, or else the initial size.
func (w *RecvWindow) startLimit() int64 {
	if w.hint == nil {
		return w.floor
	}
	return min(max(w.hint.limit(), w.floor), w.ceiling)
}

// Grant returns credit to send at once so that the peer may send up to the
// current limit beyond what was consumed; a window whose limit starts above
// its initial grant (see AutoTune) uses it to tell the peer so.
func (w *RecvWindow) Grant() uint32 {
	return w.grantUpTo(w.consumed.Load() + w.limit.Load())
}

// now reads a monotonic clock in nanoseconds; tests replace it.
var now = func() int64 { return int64(time.Since(epoch)) }

// NewRecvWindow returns a window whose peer starts with initial bytes of
// credit (what this side announced), and that keeps granting so that about
// limit bytes are outstanding.
func NewRecvWindow(initial, limit uint32) *RecvWindow {
	w := &RecvWindow{}
	w.granted.Store(int64(initial))
	w.SetLimit(limit)
	return w
}

// SetLimit changes the target window. Growth takes effect at the next
// Consume; shrinking never takes back credit already granted, as the protocol
// requires, it only slows later grants.
func (w *RecvWindow) SetLimit(limit uint32) {
	w.limit.Store(int64(max(min(limit, MaxWindow), MinWindow)))
}

// Limit reports the current target window.
func (w *RecvWindow) Limit() uint32 { return uint32(w.limit.Load()) }

// Buffered reports how many received bytes the application has not consumed.
func (w *RecvWindow) Buffered() int64 { return w.received.Load() - w.consumed.Load() }

// Receive records n bytes arriving from the peer. It returns ErrOverrun if
// they exceed what was granted; the bytes are counted either way.
func (w *RecvWindow) Receive(n int) error {
	r := w.received.Add(int64(n))
	if r > w.granted.Load() {
		return ErrOverrun
	}
	if w.ceiling > w.floor {
		if sample := w.bdp.received(r, n); sample > 0 {
			w.grow(sample)
		}
	}
	return nil
}

// grow raises the limit when a bandwidth-delay sample shows the window was
// nearly used up within one round trip.
func (w *RecvWindow) grow(sample int64) {
	limit := w.limit.Load()
	if sample*3 >= limit*2 && limit < w.ceiling {
		limit = min(max(2*sample, limit), w.ceiling)
		w.limit.Store(limit)
		if w.hint != nil {
			w.hint.record(limit)
		}
	}
}

// BeginMessage records that a message of size bytes starts at the current
// offset. A message larger than the window could never complete while the
// application waits for it, so the window is widened to cover all of it. It
// returns the extra credit to send the peer at once, or 0.
func (w *RecvWindow) BeginMessage(size uint32) uint32 {
	if int64(size) <= w.limit.Load() {
		return 0
	}
	return w.grantUpTo(w.received.Load() + int64(size))
}

// Consume records that the application took n bytes. It returns the credit to
// send the peer in a window update, or 0 when the grant is still within three
// quarters of the limit: batching keeps small messages from costing one update
// each.
func (w *RecvWindow) Consume(n int) uint32 {
	c := w.consumed.Add(int64(n))
	limit := w.limit.Load()
	if w.ceiling > w.floor {
		limit = w.tune(limit)
	}
	target := c + limit
	if target-w.granted.Load() < max(limit/4, 1) {
		return 0
	}
	return w.grantUpTo(target)
}

// tune applies the idle rule at a Consume and returns the limit to grant by.
func (w *RecvWindow) tune(limit int64) int64 {
	t := now()
	if last := w.lastUsed.Swap(t); w.idle > 0 && time.Duration(t-last) > w.idle {
		limit = w.startLimit()
		w.limit.Store(limit)
	}
	return limit
}

// grantUpTo raises granted to target and returns the increase, or 0 if the
// grant is already there.
func (w *RecvWindow) grantUpTo(target int64) uint32 {
	for {
		g := w.granted.Load()
		if target <= g {
			return 0
		}
		inc := min(target-g, MaxWindow)
		if w.granted.CompareAndSwap(g, g+inc) {
			if w.ceiling > w.floor {
				w.bdp.granted(g)
			}
			return uint32(inc)
		}
	}
}
