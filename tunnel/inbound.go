package tunnel

import (
	"sync"

	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// message is one complete tunneled message: its bytes where they arrived,
// in gRPC's receive buffers, never copied here. The first piece is kept
// apart so that a message in one piece, the common case, needs no list.
// gathered hands it to the codec, or free drops it.
type message struct {
	first piece
	rest  []piece
	size  int
}

// add appends p, taking over its reference.
func (m *message) add(p piece) {
	if m.first.data == nil {
		m.first = p
		return
	}
	m.rest = append(m.rest, p)
}

// free drops the message's references.
func (m message) free() {
	m.first.free()
	for _, p := range m.rest {
		p.free()
	}
}

// inbound is the receiving half of one tunneled stream: it reassembles
// messages from chunks, enforces the size limit and the receive window, and
// holds complete messages until the application asks for them.
//
// The reader goroutine is the only caller of startMessage, moreData and
// waitForSpace, so reassembly state needs no lock; only the queue of complete
// messages is shared with the consumer.
type inbound struct {
	win     *flowcontrol.RecvWindow // nil without flow control
	hold    int                     // without flow control: queue this much, then make the reader wait
	maxSize int                     // largest message accepted
	budget  *budget                 // the tunnel's, shared by its streams
	kind    string                  // "request" or "response", for errors

	// Reassembly, owned by the reader.
	partial   message
	remaining int
	active    bool

	mu       sync.Mutex
	msgs     []message
	queued   int   // bytes in msgs
	held     int   // bytes taken from the budget: queued plus the partial message
	detached bool  // the queued messages no longer count against the budget
	err      error // set when no more messages will be queued
	aborted  bool  // err applies at once, queued messages are dropped
	signal   chan struct{}
	consumed chan struct{}
}

func newInbound(win *flowcontrol.RecvWindow, hold, maxSize int, b *budget, kind string) *inbound {
	in := &inbound{
		kind:    kind,
		win:     win,
		hold:    hold,
		maxSize: maxSize,
		budget:  b,
		signal:  make(chan struct{}, 1),
	}
	if win == nil {
		// Only waitForSpace waits for consumption, and only without a
		// window; with one, consumed stays nil and notifying it is a no-op.
		in.consumed = make(chan struct{}, 1)
	}
	return in
}

// startMessage handles the first frame of a message, whose data is c. It
// returns credit to grant the peer at once (a message larger than the window
// needs it), or a status error that ends the stream. What it keeps of c it
// takes references for; c stays the caller's.
func (in *inbound) startMessage(size uint32, c *chunk) (uint32, error) {
	if in.active {
		return 0, errMessageStartedTwice
	}
	if int64(size) > int64(in.maxSize) {
		return 0, errMessageTooLarge(in.kind, size, in.maxSize)
	}
	if c.len > int(size) {
		return 0, errFirstChunkOverruns(c.len, size)
	}
	var update uint32
	if in.win != nil {
		update = in.win.BeginMessage(size)
		if err := in.win.Receive(c.len); err != nil {
			return 0, windowOverrun(err)
		}
	}
	in.active = true
	in.partial = message{size: int(size)}
	in.remaining = int(size)
	return update, in.appendChunk(c)
}

// moreData handles a continuation chunk, c, as startMessage does.
func (in *inbound) moreData(c *chunk) error {
	if !in.active {
		return errDataWithoutMessage
	}
	if c.len > in.remaining {
		return errChunkOverruns(in.partial.size)
	}
	if in.win != nil {
		if err := in.win.Receive(c.len); err != nil {
			return windowOverrun(err)
		}
	}
	return in.appendChunk(c)
}

// appendChunk adds a chunk to the message in progress, charging it to the
// tunnel's budget, and queues the message once it is complete.
func (in *inbound) appendChunk(c *chunk) error {
	if n := c.len; n > 0 {
		if !in.budget.take(n) {
			return errBudget
		}
		in.mu.Lock()
		if in.aborted {
			// Nobody will consume it; give the bytes back at once.
			in.mu.Unlock()
			in.budget.release(n)
		} else {
			in.held += n
			in.mu.Unlock()
		}
		for _, p := range c.pieces {
			p.ref()
			in.partial.add(p)
		}
		in.remaining -= n
	}
	if in.remaining > 0 {
		return nil
	}
	m := in.partial
	in.partial = message{}
	in.active = false
	in.mu.Lock()
	keep := in.err == nil
	if keep {
		in.msgs = append(in.msgs, m)
		in.queued += m.size
	}
	in.mu.Unlock()
	if !keep {
		m.free()
	}
	notify(in.signal)
	return nil
}

// waitForSpace makes the reader wait while a stream without flow control has
// more than its share queued. That stalls the whole tunnel, which is what the
// plain protocol's revision zero implies; with flow control the window bounds
// the queue instead and this returns at once.
func (in *inbound) waitForSpace(done <-chan struct{}) {
	if in.win != nil {
		return
	}
	for {
		in.mu.Lock()
		full := in.queued > in.hold && in.err == nil
		in.mu.Unlock()
		if !full {
			return
		}
		select {
		case <-in.consumed:
		case <-done:
			return
		}
	}
}

// finish records that the peer will send no more messages; err is io.EOF for
// a normal end. Messages already queued are still delivered. Only the reader
// calls it.
func (in *inbound) finish(err error) {
	partial := 0
	if in.active {
		// A message cut short by the end will never be delivered.
		partial = in.partial.size - in.remaining
		in.partial.free()
		in.active, in.partial = false, message{}
	}
	in.mu.Lock()
	if in.err == nil {
		in.err = err
	}
	if !in.aborted {
		in.held -= partial
		in.budget.release(partial)
	}
	in.mu.Unlock()
	notify(in.signal)
}

// detach gives the queued messages' bytes back to the tunnel's budget while
// keeping the messages for the application. It is for a call the peer has
// closed: no more data can come on it, so what is left belongs to the call,
// as in gRPC, and a caller that never reads it must not starve the tunnel's
// other calls. Only the reader calls it, after finish.
func (in *inbound) detach() {
	in.mu.Lock()
	if !in.detached {
		in.detached = true
		in.budget.release(in.held)
		in.held = 0
	}
	in.mu.Unlock()
}

// abort ends the stream at once with err, dropping undelivered messages.
func (in *inbound) abort(err error) {
	var dropped []message
	in.mu.Lock()
	if !in.aborted {
		in.aborted = true
		in.err = err
		dropped = in.msgs
		in.msgs = nil
		in.queued = 0
		in.budget.release(in.held)
		in.held = 0
	}
	in.mu.Unlock()
	for _, m := range dropped {
		m.free()
	}
	notify(in.signal)
	notify(in.consumed)
}

// recv returns the next message, or the error that ended the stream, or
// errDone when done closes first. update is the window credit to return to
// the peer now that the message is consumed.
func (in *inbound) recv(done <-chan struct{}) (m message, update uint32, err error) {
	for {
		got := false
		in.mu.Lock()
		switch {
		case in.aborted:
			err = in.err
		case len(in.msgs) > 0:
			m, got = in.msgs[0], true
			in.msgs[0] = message{}
			in.msgs = in.msgs[1:]
			in.queued -= m.size
			if !in.detached {
				in.held -= m.size
				in.budget.release(m.size)
			}
		case in.err != nil:
			err = in.err
		}
		in.mu.Unlock()
		if err != nil {
			return message{}, 0, err
		}
		if got {
			if in.win != nil {
				update = in.win.Consume(m.size)
			} else {
				notify(in.consumed)
			}
			return m, update, nil
		}
		select {
		case <-in.signal:
		case <-done:
			return message{}, 0, errDone
		}
	}
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// gathered returns a message as the codec wants it, one contiguous buffer,
// copying only when it arrived in several pieces, and gives up the
// message's references. The caller frees the result once the codec is done
// with it.
func (m message) gathered() mem.BufferSlice {
	switch {
	case m.first.data == nil:
		return nil
	case len(m.rest) == 0:
		return m.first.lend()
	}
	buf := unclearedPool.Get(m.size)
	off := copy(*buf, m.first.data)
	for _, p := range m.rest {
		off += copy((*buf)[off:], p.data)
	}
	m.free()
	return mem.BufferSlice{mem.NewBuffer(buf, unclearedPool)}
}
