package tunnel

import (
	"google.golang.org/grpc/metadata"
)

// clientState is where a call issued through a tunnel stands, in one word.
// The call has two independent sides, as the protocol does, plus the
// caller's end of it:
//
//   - what it has received (the low two bits): callAwaitingHeaders, then
//     callReceiving once response headers or a first message came, then
//     callEnded once close_stream came or the call ended on this side;
//   - what it has sent: callHalfClosed once half_close went (or was due);
//   - callFinished once the caller has taken the call's result.
//
// Three goroutines move it: the tunnel's reader (frames from the server),
// the caller (sends, CloseSend, RecvMsg) and a context.AfterFunc (the
// call's context ending); the tunnel's shutdown ends it too. Every change
// goes through clientStream.transition, which applies next, the protocol's
// rules, in one place.
type clientState uint32

// What the call has received.
const (
	// callAwaitingHeaders: nothing yet; response headers may come, at most
	// once and before any message.
	callAwaitingHeaders clientState = 0
	// callReceiving: headers, or a first message that stands for empty
	// ones, came; messages may follow, headers may not.
	callReceiving clientState = 1
	// callEnded: close_stream came, or the call ended on this side (a
	// broken rule, its context, the tunnel's end). Nothing more is taken
	// from the server.
	callEnded clientState = 2
	// callReceiveMask selects what the call has received.
	callReceiveMask clientState = 3
)

// What the call has sent, and the caller's end.
const (
	// callHalfClosed: half_close went, or goes with the call's one
	// request; no request may follow.
	callHalfClosed clientState = 1 << 2
	// callFinished: the caller has the call's result (clientStream.final).
	callFinished clientState = 1 << 3
)

// received returns what the call has received.
func (s clientState) received() clientState { return s & callReceiveMask }

// receiving returns s with what the call has received set to r.
func (s clientState) receiving(r clientState) clientState { return s&^callReceiveMask | r }

// clientEvent is something that happens to a call issued through a tunnel:
// a frame from the server or an act of the caller.
type clientEvent uint8

const (
	// Frames from the server, seen by the reader.
	clientGotHeaders clientEvent = iota // response_headers
	clientGotMessage                    // response_message: a message's first chunk
	clientGotData                       // more_response_data: a further chunk
	clientGotClose                      // close_stream: the status and trailers
	// clientAborted: the call ends on this side, from any goroutine: the
	// server broke the call's rules, the caller could not decode a
	// response, the call's context ended or the tunnel did.
	clientAborted
	// Acts of the caller.
	clientSendMsg   // SendMsg: a request is to go
	clientCloseSend // CloseSend, or a unary request sent with half_close
	clientFinish    // the caller takes the call's result
)

// next is the protocol of one call as its client sees it: the state that ev
// leads to from s, or why ev is not allowed in s. errLate means that ev
// finds the call past it and changes nothing; any other error is a broken
// rule, the call's status if it ends for it.
func (s clientState) next(ev clientEvent) (clientState, error) {
	received := s.received()
	switch ev {
	case clientGotHeaders:
		// Response headers are optional, come at most once and before
		// any message.
		switch received {
		case callAwaitingHeaders:
			return s.receiving(callReceiving), nil
		case callReceiving:
			return s, errHeadersTwice
		}
		return s, errLate
	case clientGotMessage:
		// A message with no headers before it ends them: the server
		// skipped empty ones, as the protocol allows.
		if received == callEnded {
			return s, errLate
		}
		return s.receiving(callReceiving), nil
	case clientGotData:
		// Whether a message is in progress is the reassembly's to judge
		// (inbound), not the call's.
		if received == callEnded {
			return s, errLate
		}
		return s, nil
	case clientGotClose, clientAborted:
		// close_stream ends the call, with or without headers before it
		// (a lone close_stream is a trailers-only response); so does a
		// local end, which sends cancel instead.
		if received == callEnded {
			return s, errLate
		}
		return s.receiving(callEnded), nil
	case clientSendMsg:
		// Requests go until half_close; on a call that has ended the
		// send is pointless, and RecvMsg gives the status.
		switch {
		case s&callHalfClosed != 0:
			return s, errSendAfterCloseSend
		case received == callEnded:
			return s, errLate
		}
		return s, nil
	case clientCloseSend:
		// half_close goes once.
		if s&callHalfClosed != 0 {
			return s, errLate
		}
		return s | callHalfClosed, nil
	case clientFinish:
		if s&callFinished != 0 {
			return s, errLate
		}
		return s | callFinished, nil
	}
	panic("grpctunnel: unknown client stream event")
}

// clientChange is an event with what it brings: the headers of
// clientGotHeaders, the trailers and status of clientGotClose, the reason of
// clientAborted.
type clientChange struct {
	ev      clientEvent
	header  metadata.MD // clientGotHeaders
	trailer metadata.MD // clientGotClose
	// err is clientGotClose's status (io.EOF for OK) or clientAborted's
	// reason.
	err error
}

// transition applies c.ev to the call: it returns the state the event found
// and, as next does, why it was not allowed there. It is the only place the
// state changes, and the only place headerReady and ended close:
//
//   - headerReady closes as the call leaves callAwaitingHeaders, after the
//     headers are set (empty ones if a message or the end came first);
//   - ended closes as the call reaches callEnded, after the trailers and
//     closeErr are set and the inbound queue is finished or aborted.
//
// An event that changes nothing (a message after the first, a send) takes
// no lock: every goroutine reads the state with one atomic load. A change
// takes mu and judges the event again under it, since another goroutine may
// have moved the call meanwhile; what it writes and closes happens under mu
// too, so that an end that races with the headers closes ended only after
// the headers are in place. Nothing under mu touches the network.
func (st *clientStream) transition(c clientChange) (clientState, error) {
	from := clientState(st.state.Load())
	to, err := from.next(c.ev)
	if err != nil || to == from {
		return from, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	from = clientState(st.state.Load())
	to, err = from.next(c.ev)
	if err != nil || to == from {
		return from, err
	}
	switch c.ev {
	case clientGotHeaders:
		st.header = c.header
	case clientGotMessage:
		st.header = metadata.MD{}
	case clientGotClose:
		st.trailer = c.trailer
		st.closeErr = c.err
		st.in.finish(c.err)
		// Whatever is left now belongs to the call; released before the
		// end is visible, so that no one sees a closed call still charged.
		st.in.detach()
	case clientAborted:
		st.closeErr = c.err
		st.in.abort(c.err)
	}
	st.state.Store(uint32(to))
	if from.received() == callAwaitingHeaders && to.received() != callAwaitingHeaders {
		close(st.headerReady)
	}
	if from.received() != callEnded && to.received() == callEnded {
		close(st.ended)
	}
	return from, nil
}

// check judges ev in the call's state now, as next does, without applying
// it.
func (st *clientStream) check(ev clientEvent) error {
	_, err := clientState(st.state.Load()).next(ev)
	return err
}
