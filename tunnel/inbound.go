package tunnel

import (
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// message is one complete tunneled message: the chunks as they arrived, never
// copied into one buffer here. A codec that needs contiguous bytes gathers
// them itself, once.
type message struct {
	chunks mem.BufferSlice
	size   int
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
	partial   mem.BufferSlice
	size      int
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

// startMessage handles the first frame of a message. It returns credit to
// grant the peer at once (a message larger than the window needs it), or a
// status error that ends the stream.
func (in *inbound) startMessage(size uint32, data []byte) (uint32, error) {
	if in.active {
		return 0, status.Error(codes.Internal, "grpctunnel: new message started before the previous one completed")
	}
	if int64(size) > int64(in.maxSize) {
		return 0, status.Errorf(codes.ResourceExhausted, "grpctunnel: received %s message larger than max (%d vs. %d)", in.kind, size, in.maxSize)
	}
	if len(data) > int(size) {
		return 0, status.Errorf(codes.Internal, "grpctunnel: message chunk of %d bytes overruns its declared size of %d", len(data), size)
	}
	var update uint32
	if in.win != nil {
		update = in.win.BeginMessage(size)
		if err := in.win.Receive(len(data)); err != nil {
			return 0, windowOverrun(err)
		}
	}
	in.active = true
	in.size = int(size)
	in.remaining = int(size)
	in.partial = in.partial[:0]
	return update, in.appendChunk(data)
}

// moreData handles a continuation chunk.
func (in *inbound) moreData(data []byte) error {
	if !in.active {
		return status.Error(codes.Internal, "grpctunnel: message data received with no message started")
	}
	if len(data) > in.remaining {
		return status.Errorf(codes.Internal, "grpctunnel: message chunk overruns the declared size of %d bytes", in.size)
	}
	if in.win != nil {
		if err := in.win.Receive(len(data)); err != nil {
			return windowOverrun(err)
		}
	}
	return in.appendChunk(data)
}

// appendChunk adds a chunk to the message in progress, charging it to the
// tunnel's budget, and queues the message once it is complete.
func (in *inbound) appendChunk(data []byte) error {
	if len(data) > 0 {
		if !in.budget.take(len(data)) {
			return errBudget
		}
		in.mu.Lock()
		if in.aborted {
			// Nobody will consume it; give the bytes back at once.
			in.mu.Unlock()
			in.budget.release(len(data))
		} else {
			in.held += len(data)
			in.mu.Unlock()
		}
		in.partial = append(in.partial, mem.SliceBuffer(data))
		in.remaining -= len(data)
	}
	if in.remaining > 0 {
		return nil
	}
	m := message{chunks: in.partial, size: in.size}
	in.partial = nil
	in.active = false
	in.mu.Lock()
	if in.err == nil {
		in.msgs = append(in.msgs, m)
		in.queued += m.size
	}
	in.mu.Unlock()
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
		partial = in.size - in.remaining
		in.active, in.partial = false, nil
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
	in.mu.Lock()
	if !in.aborted {
		in.aborted = true
		in.err = err
		in.msgs = nil
		in.queued = 0
		in.budget.release(in.held)
		in.held = 0
	}
	in.mu.Unlock()
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
// copying only when it arrived in several chunks. The caller frees the
// result once the codec is done with it.
func (m message) gathered() mem.BufferSlice {
	if len(m.chunks) <= 1 {
		return m.chunks
	}
	buf := gatherPool.Get(m.size)
	off := 0
	for _, c := range m.chunks {
		off += copy((*buf)[off:], c.ReadOnlyData())
	}
	m.chunks.Free()
	return mem.BufferSlice{mem.NewBuffer(buf, gatherPool)}
}
