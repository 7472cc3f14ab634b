package tunnel

import (
	"sync"
	"sync/atomic"
)

// sender owns the sending half of the outer stream. gRPC allows one sender
// at a time, so every frame goes out under mu. Callers that may block (a
// stream sending its messages) send directly; callers that must never block
// on the network, above all the reader goroutine, queue control frames that
// a short-lived flusher goroutine writes. Without that split, two peers
// whose readers both wait on a full outer stream would deadlock.
type sender[F any] struct {
	send func(F) error
	// sendHeld is sendLocked, bound once: the send function Do hands out,
	// so that a hold of the sender allocates nothing.
	sendHeld func(F) error

	mu  sync.Mutex // serializes send
	err error      // first send failure or close reason; guarded by mu

	qmu      sync.Mutex
	queue    []F
	flushing bool
	closed   bool // no more frames are queued
	flusher  sync.WaitGroup

	onFail func(error) // called once, off mu, when a send fails
	failed sync.Once

	// payloadSent counts the message payload bytes written, for
	// TunnelInfo.BytesSent.
	payloadSent atomic.Uint64
}

func newSender[F any](send func(F) error, onFail func(error)) *sender[F] {
	s := &sender[F]{send: send, onFail: onFail}
	s.sendHeld = s.sendLocked
	return s
}

// Send writes f, blocking while the outer stream is full.
func (s *sender[F]) Send(f F) error {
	if err := s.hold(); err != nil {
		return err
	}
	err := s.sendLocked(f)
	s.release()
	return err
}

// sendLocked writes f under mu. Once a send has failed, every later one
// fails the same way.
func (s *sender[F]) sendLocked(f F) error {
	if s.err != nil {
		return s.err
	}
	if err := s.send(f); err != nil {
		s.err = err
		return err
	}
	if n := framePayload(f); n > 0 {
		s.payloadSent.Add(uint64(n))
	}
	return nil
}

// hold takes exclusive use of the outer stream for sendLocked, as Do does
// without a function to call; release must follow unless it fails.
func (s *sender[F]) hold() error {
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	return nil
}

// release ends a hold.
func (s *sender[F]) release() {
	// s.err was nil when the hold began: if it is set now, a send failed.
	sendErr := s.err
	s.mu.Unlock()
	if sendErr != nil {
		s.fail(sendErr)
	}
}

// Do runs fn with exclusive use of the outer stream, for a group of frames
// that must go out together and in order (a new stream's ID is allocated and
// its first frame sent under one hold, so IDs reach the peer increasing).
func (s *sender[F]) Do(fn func(send func(F) error) error) error {
	if err := s.hold(); err != nil {
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
		// Do's release call onFail with it, which ends the tunnel with the
		// cause, and later sends fail at once with that same error.
		// Queued frames are control frames whose senders do not wait for
		// them.
		_ = s.Do(func(send func(F) error) error {
			for _, f := range batch {
				if err := send(f); err != nil {
					return err
				}
			}
			return nil
		})
	}
}

// Close makes every later send fail with err and waits for the send in
// progress, if any, and for the flusher. The caller must make sure a blocked
// send can finish (by ending the outer stream) or Close waits for it.
func (s *sender[F]) Close(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.qmu.Lock()
	s.closed = true
	s.queue = nil
	s.qmu.Unlock()
	s.flusher.Wait()
}

func (s *sender[F]) fail(err error) {
	s.failed.Do(func() {
		if s.onFail != nil {
			s.onFail(err)
		}
	})
}
