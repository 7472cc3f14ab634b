package tunnel

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// endState is where a tunnel is in its life. It only moves forward: open,
// then possibly draining, then closed.
type endState uint8

const (
	// endOpen takes new calls.
	endOpen endState = iota
	// endDraining takes no new call and ends once the calls in progress
	// are over.
	endDraining
	// endClosed has ended; nothing new starts on it.
	endClosed
)

// endFramer builds the frames an end sends on the tunnel's own stream (-1,
// settingsStreamID): clientFramer and serverFramer on that stream are the two.
type endFramer[F any] interface {
	// windowUpdate is a keepalive ping or pong.
	windowUpdate(n uint32) F
	// closeTunnel asks the peer to end the outer stream (tunnel-close
	// extension).
	closeTunnel() F
}

// endSide is what one kind of end adds to the life that tunnelEnd runs;
// tunnelClient and tunnelServer implement it.
type endSide interface {
	// closing runs under mu as the tunnel closes. What it returns, if not
	// nil, runs once the tunnel's context is cancelled and the peer asked
	// to close, before done closes; it may not take mu.
	closing(err error) (after func())
	// announceDrain tells the peer, if this end can, that the tunnel has
	// begun to drain.
	announceDrain()
	// endIdle ends a drained tunnel that has no stream left.
	endIdle()
}

// tunnelEnd is what both ends of a tunnel share: the tunnel client, which
// issues calls, and the tunnel server, which handles them, each embed one.
// It holds the tunnel's life (its state, its end and why), the sending half
// of the outer stream, the table of streams, the keepalive and what Info
// reports. F is the type of the frames this end sends, S its streams.
//
// Fields other than those marked otherwise are set before the tunnel's
// goroutines start and never change after.
type tunnelEnd[F, S any] struct {
	side    endSide
	ctx     context.Context // parent of everything the tunnel does
	cancel  context.CancelFunc
	out     *sender[F]
	control endFramer[F] // frames on the tunnel's own stream
	opts    *options
	agreed  agreement
	reverse bool
	client  bool // this is the tunnel client, for stats and Info
	peer    *peer.Peer
	// conn reports the tunnel to the stats handler.
	conn tunnelStats
	// abort, if set, cancels the outer stream when the tunnel's context
	// does not: a tunnel server that dialled sets it, so that a blocked
	// read returns when the tunnel ends for any other reason.
	abort context.CancelFunc

	// hint carries window growth from one stream to the next.
	hint flowcontrol.Hint
	// buffered bounds the unread data of all streams together.
	buffered budget
	// ka watches for a silent peer; set under mu once the tunnel is ready
	// (see watchPeer).
	ka *keepalive
	// peerDead is set when ka gives the peer up, before the tunnel ends.
	peerDead atomic.Bool
	// counters feed Info.
	counters tunnelCounters

	// load is len(streams) and refusing is state != endOpen, kept as
	// atomics beside them so that a pool can pick a tunnel without taking
	// every tunnel's lock. Both change only under mu, refusing only in
	// setState.
	load     atomic.Int32
	refusing atomic.Bool

	mu      sync.Mutex
	state   endState
	streams map[int64]S
	// lastID is the highest stream ID opened: the tunnel client allocates
	// IDs under mu, the tunnel server's reader records them.
	lastID int64
	// askPeerToClose is set on a network server that reads on its handler
	// goroutine: ending the tunnel then means asking the network client to
	// end the outer stream (tunnel-close extension). Set before any
	// goroutine of the tunnel starts; later changes are under mu.
	askPeerToClose bool

	done chan struct{}
	err  error // why the tunnel ended; set before done closes
	once sync.Once
}

// begin makes the core ready, once the fields of a composite literal are
// set: it reports the tunnel to the stats handler h and sets up the sender
// over send. side is the end that embeds the core.
func (e *tunnelEnd[F, S]) begin(side endSide, ctx context.Context, h stats.Handler, send func(any) error, control endFramer[F]) {
	e.side = side
	e.control = control
	e.ctx = e.conn.begin(h, ctx, e.peer, e.client)
	e.out = newSender[F](send, func(err error) { e.shutdown(tunnelFailure(err)) })
	e.out.ended = e.done
	e.buffered.limit = e.opts.maxBuffered
	e.counters.openedAt = time.Now()
}

// setState moves the tunnel to s, under mu, and reports whether it moved. It
// holds the rules of the tunnel's life: it only moves forward (a closed
// tunnel stays closed, draining again is no move), and the lock-free mirror
// refusing follows it here and nowhere else.
func (e *tunnelEnd[F, S]) setState(s endState) bool {
	if s <= e.state {
		return false
	}
	e.state = s
	e.refusing.Store(s != endOpen)
	return true
}

// watchPeer starts the keepalive, if both ends agreed to it, unless the
// tunnel has already ended.
func (e *tunnelEnd[F, S]) watchPeer() {
	if !e.agreed.keepalive {
		return
	}
	e.mu.Lock()
	if e.state != endClosed {
		e.ka = startKeepalive(e.opts.keepaliveInterval, e.opts.keepaliveTimeout, func(v uint32) {
			e.out.Queue(e.control.windowUpdate(v))
		}, func(err error) {
			e.peerDead.Store(true)
			e.shutdown(err)
		})
	}
	e.mu.Unlock()
}

// keepaliveFrame reports whether a window update for stream id belongs to
// the keepalive, answering it if it is a ping. The reader calls it, so the
// pong is queued, never sent.
func (e *tunnelEnd[F, S]) keepaliveFrame(id int64, v uint32) bool {
	if id != settingsStreamID || !e.agreed.keepalive {
		return false
	}
	if v&pingBit != 0 {
		e.out.Queue(e.control.windowUpdate(v &^ pingBit))
	}
	return true
}

// lookup finds the stream a frame is for. ok is false if there is none: a
// frame for a stream that ended is dropped (err is nil), since its frames
// race with the end; one for a stream never opened breaks the protocol.
func (e *tunnelEnd[F, S]) lookup(id int64) (st S, ok bool, err error) {
	e.mu.Lock()
	st, ok = e.streams[id]
	last := e.lastID
	e.mu.Unlock()
	if !ok && (id <= 0 || id > last) {
		err = protocolErrorf("frame for stream %d, which was never opened", id)
	}
	return st, ok, err
}

// addLocked puts a started stream in the table; mu must be held.
func (e *tunnelEnd[F, S]) addLocked(id int64, st S) {
	e.streams[id] = st
	e.load.Add(1)
	e.counters.started++
}

// forget drops a stream from the table; a drained tunnel with no streams
// left then ends.
func (e *tunnelEnd[F, S]) forget(id int64) {
	e.mu.Lock()
	if _, ok := e.streams[id]; ok {
		delete(e.streams, id)
		e.load.Add(-1)
	}
	idle := e.idleLocked()
	e.mu.Unlock()
	if idle {
		e.side.endIdle()
	}
}

// idleLocked reports whether the tunnel drains, has no stream left and is
// to be ended by this end; mu must be held. The tunnel server leaves that to
// the client when it told it of the drain (drain extension), since only the
// client knows that no new call is on its way.
func (e *tunnelEnd[F, S]) idleLocked() bool {
	return e.state == endDraining && len(e.streams) == 0 && (e.client || !e.agreed.drain)
}

// drain refuses new calls and ends the tunnel once the calls in progress are
// over; see endSide.announceDrain and idleLocked for what each end does.
func (e *tunnelEnd[F, S]) drain() {
	e.mu.Lock()
	began := e.setState(endDraining)
	idle := e.idleLocked()
	e.mu.Unlock()
	if !began {
		return
	}
	e.side.announceDrain()
	if idle {
		e.side.endIdle()
	}
}

// shutdown ends the tunnel, once: its context is cancelled (handlers and
// calls see it), the keepalive stops, the peer is asked to close if it must
// be, and done closes. The outer stream is released by its owner once done
// is closed.
func (e *tunnelEnd[F, S]) shutdown(err error) {
	e.once.Do(func() {
		e.mu.Lock()
		e.setState(endClosed)
		e.err = err
		ka := e.ka
		askPeer := e.askPeerToClose
		after := e.side.closing(err)
		e.mu.Unlock()
		ka.stop()
		e.cancel()
		if e.abort != nil {
			e.abort()
		}
		if askPeer {
			e.out.Queue(e.control.closeTunnel())
		}
		if after != nil {
			after()
		}
		e.conn.end(e.client)
		close(e.done)
	})
}
