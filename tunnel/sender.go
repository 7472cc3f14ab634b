package tunnel

import (
	"sync"
	"sync/atomic"
	"time"
)

// sender owns the sending half of the outer stream. gRPC allows one sender
// at a time, so every frame goes out by the goroutine that holds the turn.
// Callers that may block (a stream sending its messages) send directly, on
// their own goroutine, so that a full outer stream holds back exactly the
// caller whose frame does not fit; callers that must never block on the
// network, above all the reader goroutine, queue control frames that a
// short-lived flusher goroutine writes. Without that split, two peers whose
// readers both wait on a full outer stream would deadlock.
//
// The turn is a channel of capacity one rather than a mutex, because a
// goroutine waiting for it must be able to give up: a peer that stops
// reading blocks the holder in Send for as long as the outer stream lives,
// and every other sender behind it must still return when its call ends
// (done) or the tunnel does (ended), not when the connection finally dies.
// Waiters queue on the channel in order, so no sender starves.
type sender[F any] struct {
	// send is the outer stream's SendMsg. It takes frames of type F and
	// the data frames of sendMessage, which are not.
	send func(any) error
	// sendHeld is sendLocked, bound once: the send function Do hands out,
	// so that a hold of the sender allocates nothing.
	sendHeld func(F) error

	// turn holds a value while some goroutine may send: taking the turn is
	// putting it there, releasing it is taking it out.
	turn chan struct{}
	// err is the first send failure or close reason: set once, after which
	// no hold begins and no frame is sent.
	err atomic.Pointer[error]
	// sendErr is the failure of a send in the current hold, for release to
	// report; only the holder touches it.
	sendErr error
	// shut closes with Close or abandon, releasing every waiter at once.
	shut     chan struct{}
	shutOnce sync.Once
	// ended is the tunnel's done channel, when the sender belongs to one:
	// a caller waiting for the turn gives up when the tunnel ends. The
	// flusher does not watch it, since frames queued as the tunnel ends
	// (the tunnel-close request) must still leave.
	ended <-chan struct{}

	qmu      sync.Mutex
	queue    []F
	flushing bool
	closed   bool // no more frames are queued
	flusher  sync.WaitGroup

	onFail func(error) // called once, after release, when a send fails
	failed sync.Once

	// payloadSent counts the message payload bytes written, for
	// TunnelInfo.BytesSent.
	payloadSent atomic.Uint64
	// sends counts the calls of send that returned, so that a send that
	// does not return can be told from one that does (see outlast).
	sends atomic.Uint64
}

func newSender[F any](send func(any) error, onFail func(error)) *sender[F] {
	s := &sender[F]{send: send, onFail: onFail, turn: make(chan struct{}, 1), shut: make(chan struct{})}
	s.sendHeld = s.sendLocked
	return s
}

// Send writes f, blocking while the outer stream is full. If done closes
// while it waits for its turn, it gives up with errDone, sending nothing.
func (s *sender[F]) Send(done <-chan struct{}, f F) error {
	return s.sendFrame(done, f)
}

// sendFrame is Send for any frame the outer stream takes, a data frame of
// sendMessage's included.
func (s *sender[F]) sendFrame(done <-chan struct{}, f any) error {
	if err := s.hold(done); err != nil {
		return err
	}
	err := s.writeLocked(f)
	s.release()
	return err
}

// sendLocked writes f during a hold. Once a send has failed, or the sender
// was closed, every later one fails the same way.
func (s *sender[F]) sendLocked(f F) error { return s.writeLocked(f) }

func (s *sender[F]) writeLocked(f any) error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	err := s.send(f)
	s.sends.Add(1)
	if err != nil {
		s.setErr(err)
		s.sendErr = err
		return err
	}
	if n := framePayload(f); n > 0 {
		s.payloadSent.Add(uint64(n))
	}
	return nil
}

// setErr records err unless an error is recorded already.
func (s *sender[F]) setErr(err error) {
	s.err.CompareAndSwap(nil, &err)
}

// hold takes exclusive use of the outer stream for sendLocked, as Do does
// without a function to call; release must follow unless it fails. It
// fails with errDone if done closes first, and with the sender's error (or
// errTunnelClosed) if the tunnel ends or the sender is closed first.
func (s *sender[F]) hold(done <-chan struct{}) error {
	return s.take(done, s.ended)
}

func (s *sender[F]) take(done, ended <-chan struct{}) error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	// Nothing but the flusher sends on an ended tunnel: its calls have
	// ended with it, and a send that began now could block on a peer that
	// stopped reading, where the tunnel's end must release everyone.
	select {
	case <-ended:
		return s.failure()
	default:
	}
	// The free turn is taken without a look at done: a call whose
	// context has just ended still sends when nothing is in the way, as
	// with a mutex, rather than lose its frames to a coin toss in select.
	select {
	case s.turn <- struct{}{}:
	default:
		select {
		case s.turn <- struct{}{}:
		case <-done:
			return errDone
		case <-ended:
			return s.failure()
		case <-s.shut:
			return s.failure()
		}
	}
	// Checked again under the turn: Close may have come in between, and a
	// hold that began after it must not send.
	if p := s.err.Load(); p != nil {
		<-s.turn
		return *p
	}
	return nil
}

// failure is why a hold cannot begin on an ended tunnel.
func (s *sender[F]) failure() error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	return errTunnelClosed
}

// release ends a hold.
func (s *sender[F]) release() {
	sendErr := s.sendErr
	s.sendErr = nil
	<-s.turn
	if sendErr != nil {
		s.fail(sendErr)
	}
}

// Do runs fn with exclusive use of the outer stream, for a group of frames
// that must go out together and in order (a new stream's ID is allocated and
// its first frame sent under one hold, so IDs reach the peer increasing).
// Like Send, it gives up with errDone if done closes before its turn comes,
// without running fn.
func (s *sender[F]) Do(done <-chan struct{}, fn func(send func(F) error) error) error {
	if err := s.hold(done); err != nil {
		return err
	}
	err := fn(s.sendHeld)
	s.release()
	return err
}

// maxQueued bounds the control frames waiting for the outer stream. They pile
// up only when the peer makes this end answer (refusals, window updates,
// pings) while it does not read the answers; past the bound the peer has lost
// its tunnel. Go's HTTP/2 server draws the same line against the same attack.
const maxQueued = 10000

// Queue schedules f to be sent soon, without blocking. Frames queued by one
// goroutine go out in the order queued. A peer that lets maxQueued frames
// pile up fails the tunnel.
func (s *sender[F]) Queue(f F) {
	s.qmu.Lock()
	if s.closed {
		s.qmu.Unlock()
		return
	}
	if len(s.queue) >= maxQueued {
		s.closed = true
		s.queue = nil
		s.qmu.Unlock()
		s.fail(errQueueFull)
		return
	}
	s.queue = append(s.queue, f)
	start := !s.flushing
	if start {
		s.flushing = true
		s.flusher.Add(1)
	}
	s.qmu.Unlock()
	if start {
		go s.flush()
	}
}

// flush writes queued frames until the queue is empty, then exits; a later
// Queue starts a new flusher. An idle tunnel thus costs no goroutine here.
func (s *sender[F]) flush() {
	defer s.flusher.Done()
	for {
		s.qmu.Lock()
		batch := s.queue
		s.queue = nil
		if len(batch) == 0 {
			s.flushing = false
			s.qmu.Unlock()
			return
		}
		s.qmu.Unlock()
		// A failure needs no handling here: the first failed send makes
		// the release call onFail with it, which ends the tunnel with the
		// cause, and later sends fail at once with that same error; a
		// closed sender drops what is queued. Queued frames are control
		// frames whose senders do not wait for them. The flusher waits
		// past the tunnel's end (only Close stops it) so that a frame
		// queued by the end itself still leaves.
		if s.take(nil, nil) != nil {
			continue // the queue is closed and empty now
		}
		for _, f := range batch {
			if s.sendLocked(f) != nil {
				break
			}
		}
		s.release()
	}
}

// abandon makes every later send fail with err, releases every goroutine
// waiting for its turn and drops what is queued, without waiting for
// anything: a hold in progress may be blocked in the outer stream's Send,
// which only the end of the outer stream releases, and a network server
// ends the outer stream only by returning from its handler.
func (s *sender[F]) abandon(err error) {
	s.setErr(err)
	s.shutOnce.Do(func() { close(s.shut) })
	s.qmu.Lock()
	s.closed = true
	s.queue = nil
	s.qmu.Unlock()
}

// Close is abandon followed by a wait for the send in progress, if any, and
// for the flusher. The caller must make sure a blocked send can finish (by
// ending the outer stream) or Close waits for it.
func (s *sender[F]) Close(err error) {
	s.abandon(err)
	s.turn <- struct{}{}
	<-s.turn
	s.flusher.Wait()
}

// outlast waits for finished, which closes once every goroutine that might
// send has stopped, unless a send stays blocked for patience: it then
// reports false without waiting longer. It is for a network server whose
// peer was given up as dead, which can release such a send only by ending
// the outer stream, that is by returning from its handler; so it must not
// wait for it, but a send that is merely in progress (not blocked) must be
// let finish, lest it reach the outer stream after the return.
func (s *sender[F]) outlast(finished <-chan struct{}, patience time.Duration) bool {
	timer := time.NewTimer(patience)
	defer timer.Stop()
	for {
		sends := s.sends.Load()
		select {
		case <-finished:
			return true
		case <-timer.C:
		}
		if s.sends.Load() == sends && s.busy() {
			return false
		}
		timer.Reset(patience)
	}
}

// busy reports whether a hold is in progress.
func (s *sender[F]) busy() bool {
	select {
	case s.turn <- struct{}{}:
		<-s.turn
		return false
	default:
		return true
	}
}

func (s *sender[F]) fail(err error) {
	s.failed.Do(func() {
		if s.onFail != nil {
			s.onFail(err)
		}
	})
}
