package flowcontrol

import (
	"sync/atomic"
)

// SendWindow is a sender's view of how many bytes the peer will still accept
// on one stream. One goroutine takes credit with Take while any goroutine
// returns credit with Add; neither takes a lock.
//
// The zero value is not usable; see NewSendWindow and Unlimited.
type SendWindow struct {
	avail     atomic.Int64
	unlimited bool
	// ready holds a token whenever credit may have arrived since the taker
	// last looked. Its buffer of one means an Add between the taker's check
	// and its wait is never lost.
	ready chan struct{}
}

// NewSendWindow returns a window that starts with initial bytes of credit.
func NewSendWindow(initial uint32) *SendWindow {
	w := &SendWindow{ready: make(chan struct{}, 1)}
	w.avail.Store(int64(initial))
	return w
}

// Unlimited returns a window that never runs out, for streams without flow
// control (protocol revision zero).
func Unlimited() *SendWindow {
	return &SendWindow{unlimited: true, ready: make(chan struct{}, 1)}
}

// Available reports the current credit. It is a snapshot, for introspection
// and tests.
func (w *SendWindow) Available() int64 {
	if w.unlimited {
		return MaxWindow
	}
	return w.avail.Load()
}

// Add returns n bytes of credit from a peer's window update. It fails with
// ErrOverflow, leaving the window unchanged, if the credit would exceed
// MaxWindow.
func (w *SendWindow) Add(n uint32) error {
	if w.unlimited || n == 0 {
		return nil
	}
	for {
		cur := w.avail.Load()
		next := cur + int64(n)
		if next > MaxWindow {
			return ErrOverflow
		}
		if w.avail.CompareAndSwap(cur, next) {
			break
		}
	}
	select {
	case w.ready <- struct{}{}:
	default:
	}
	return nil
}

// Take waits until the window has credit, then takes up to want bytes of it
// and returns how many it took (at least one when want is positive). It
// returns 0 and false if done is closed first.
//
// Only one goroutine may call Take at a time; gRPC already forbids
// concurrent sends on one stream.
func (w *SendWindow) Take(want int, done <-chan struct{}) (int, bool) {
	if want <= 0 {
		return 0, true
	}
	if w.unlimited {
		return want, true
	}
	for {
		cur := w.avail.Load()
		if cur > 0 {
			n := min(int64(want), cur)
			if w.avail.CompareAndSwap(cur, cur-n) {
				return int(n), true
			}
			continue
		}
		select {
		case <-w.ready:
		case <-done:
			return 0, false
		}
	}
}

// TryTake takes exactly n bytes of credit if the window has that much, and
// reports whether it did. It never waits. A small message can then go out in
// one piece together with the frames around it.
func (w *SendWindow) TryTake(n int) bool {
	if w.unlimited || n <= 0 {
		return true
	}
	for {
		cur := w.avail.Load()
		if cur < int64(n) {
			return false
		}
		if w.avail.CompareAndSwap(cur, cur-int64(n)) {
			return true
		}
	}
}
