package tunnel

// serverState is where a call being handled stands, in one word. Its two
// sides move apart, as the protocol has them:
//
//   - the request side: open until the client's half_close
//     (reqHalfClosed);
//   - the response side: headers due until they go out or are skipped
//     (respHeadersSent), open until close_stream goes or the client's
//     cancel comes (callClosed). Closing here sends any headers still due,
//     so a call closed with its headers due is one the client cancelled.
//
// Two goroutines move it: the tunnel's reader (frames from the client) and
// the handler's. Every change goes through serverStream.transition (or
// transitionLocked), which applies next, the protocol's rules, in one place.
type serverState uint32

const (
	// reqHalfClosed: the client sent half_close; no request may follow.
	reqHalfClosed serverState = 1 << iota
	// respHeadersSent: the response headers went out, or were skipped as
	// the protocol allows (empty, before a message or the end); they can
	// no longer change.
	respHeadersSent
	// callClosed: close_stream went, or the client cancelled; the call's
	// result (serverStream.result) is set and nothing more is sent.
	callClosed
)

// serverEvent is something that happens to a call being handled: a frame
// from the client or an act of the handler.
type serverEvent uint8

const (
	// Frames from the client, seen by the reader.
	serverGotMessage   serverEvent = iota // request_message: a message's first chunk
	serverGotData                         // more_request_data: a further chunk
	serverGotHalfClose                    // half_close: no more requests
	serverGotCancel                       // cancel: the call is over, no close_stream follows
	// Acts of the handler's side.
	serverSetHeader  // SetHeader: headers to send later
	serverSendHeader // the headers go out now, or are skipped
	serverSetTrailer // SetTrailer: trailers to send with the status
	// serverClose: the call ends here and close_stream goes, with any
	// headers still due: the handler returned, or the client broke the
	// call's rules (then from the reader).
	serverClose
)

// next is the protocol of one call as its server sees it: the state that ev
// leads to from s, or why ev is not allowed in s. errLate means that ev
// finds the call past it and changes nothing; any other error is a broken
// rule: the call's status when the client broke it, the handler's error
// when the handler did.
func (s serverState) next(ev serverEvent) (serverState, error) {
	switch ev {
	case serverGotMessage, serverGotData:
		// Requests come until half_close. Whether a message is in
		// progress is the reassembly's to judge (inbound).
		switch {
		case s&callClosed != 0:
			return s, errLate // raced with the end
		case s&reqHalfClosed == 0:
			return s, nil
		case ev == serverGotMessage:
			return s, errMessageAfterHalfClose
		}
		return s, errDataAfterHalfClose
	case serverGotHalfClose:
		// Once is enough; a second changes nothing. (That it may not cut
		// a message short is the reassembly's rule: see onHalfClose.)
		if s&callClosed != 0 {
			return s, errLate
		}
		return s | reqHalfClosed, nil
	case serverGotCancel:
		// The client may cancel until the call is over.
		if s&callClosed != 0 {
			return s, errLate
		}
		return s | callClosed, nil
	case serverSetHeader:
		if s&(respHeadersSent|callClosed) != 0 {
			return s, errHeadersSent
		}
		return s, nil
	case serverSendHeader:
		// Headers go at most once, and not after the call is over.
		switch {
		case s&respHeadersSent != 0:
			return s, errLate
		case s&callClosed != 0:
			return s, errHeadersAfterCancel
		}
		return s | respHeadersSent, nil
	case serverSetTrailer:
		if s&callClosed != 0 {
			return s, errCallEnded
		}
		return s, nil
	case serverClose:
		// close_stream goes once, with the headers if they are still due.
		if s&callClosed != 0 {
			return s, errLate
		}
		return s | respHeadersSent | callClosed, nil
	}
	panic("grpctunnel: unknown server stream event")
}

// transition applies ev, a frame the reader got, to the call: it returns
// the state the event found and, as next does, why it was not allowed
// there. An event that changes nothing (every request chunk but for a
// broken rule) takes no lock: the reader reads the state with one atomic
// load. A change takes mu, as the handler's changes do.
func (st *serverStream) transition(ev serverEvent) (serverState, error) {
	from := serverState(st.state.Load())
	if to, err := from.next(ev); err != nil || to == from {
		return from, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.transitionLocked(ev)
}

// transitionLocked is transition with mu held, for a change that must be
// one with what mu guards: the headers and trailers the handler sets, the
// call's result. It is the only place the state changes.
func (st *serverStream) transitionLocked(ev serverEvent) (serverState, error) {
	from := serverState(st.state.Load())
	to, err := from.next(ev)
	if err == nil && to != from {
		st.state.Store(uint32(to))
	}
	return from, err
}
