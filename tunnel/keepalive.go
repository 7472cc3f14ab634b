package tunnel

import (
	"sync"
	"sync/atomic"
	"time"
)

// pingBit marks a keepalive window update on stream -1 as a ping; the answer
// carries the same value without it.
const pingBit = 1 << 31

// keepalive notices a tunnel whose peer has gone silent: a half-open
// connection, a peer whose reader is stuck, a network that drops everything.
// Any frame from the peer proves it alive. After interval without one, a
// ping goes out (keepalive extension: a window_update on stream -1 with
// pingBit set, which the peer echoes without it); after timeout more, the
// tunnel is declared dead.
//
// It holds no goroutine: a timer wakes it when the next check is due.
type keepalive struct {
	interval, timeout time.Duration
	ping              func(value uint32) // queues a ping; never blocks
	dead              func(error)        // ends the tunnel

	lastRecv atomic.Int64 // monotonic nanoseconds of the last frame

	mu      sync.Mutex
	timer   *time.Timer
	stopped bool
}

// start begins watching; it returns nil when keepalive is off.
func startKeepalive(interval, timeout time.Duration, ping func(uint32), dead func(error)) *keepalive {
	if interval <= 0 {
		return nil
	}
	k := &keepalive{interval: interval, timeout: timeout, ping: ping, dead: dead}
	k.received()
	k.mu.Lock()
	k.timer = time.AfterFunc(interval, k.check)
	k.mu.Unlock()
	return k
}

// received notes a frame from the peer. It is called for every frame, so it
// is one atomic store.
func (k *keepalive) received() {
	if k != nil {
		k.lastRecv.Store(monotonic())
	}
}

func (k *keepalive) check() {
	idle := time.Duration(monotonic() - k.lastRecv.Load())
	var next time.Duration
	switch {
	case idle >= k.interval+k.timeout:
		k.dead(errKeepalive(idle))
		return
	case idle >= k.interval:
		k.ping(pingBit | 1)
		next = k.interval + k.timeout - idle
	default:
		next = k.interval - idle
	}
	k.mu.Lock()
	if !k.stopped {
		k.timer.Reset(next)
	}
	k.mu.Unlock()
}

// stop ends the watch; safe on nil and more than once.
func (k *keepalive) stop() {
	if k == nil {
		return
	}
	k.mu.Lock()
	k.stopped = true
	k.timer.Stop()
	k.mu.Unlock()
}

// readsInline reports whether a network server reads a tunnel's frames on
// its handler's goroutine, asking the client to end the outer stream when
// the tunnel must end (tunnel-close), rather than on a goroutine of the
// tunnel's own. Only when no keepalive of this end can give the client up:
// a client given up may never answer, and a handler blocked reading could
// return only when the connection closes, while it must return at once to
// end the outer stream and release every goroutine the tunnel holds. The
// reader goroutine costs each such tunnel one goroutine more.
func (o *options) readsInline(a agreement) bool {
	return a.tunnelClose && !(a.keepalive && o.keepaliveInterval > 0)
}

// blockedSendPatience is how long a network server whose keepalive gave the
// peer up waits for a send that makes no progress before it ends the outer
// stream under it (see sender.outlast): the keepalive's timeout, since the
// peer has had that long to answer already, but never so short that a send
// merely descheduled on a loaded machine counts as blocked.
func blockedSendPatience(timeout time.Duration) time.Duration {
	return max(timeout, 100*time.Millisecond)
}

// clock anchors monotonic readings.
var clock = time.Now()

func monotonic() int64 { return int64(time.Since(clock)) }
