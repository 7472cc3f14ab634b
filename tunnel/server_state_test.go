package tunnel

import (
	"errors"
	"testing"
)

// TestServerStateTable checks serverState.next against the protocol's rules
// for one call, as its server sees them.
func TestServerStateTable(t *testing.T) {
	const (
		open       serverState = 0
		halfClosed             = reqHalfClosed
		sent                   = respHeadersSent
		closed                 = callClosed
	)
	for _, c := range []struct {
		name string
		from serverState
		ev   serverEvent
		to   serverState
		err  error // nil, errLate or the broken rule
	}{
		{"message", open, serverGotMessage, open, nil},
		{"message after half-close", halfClosed, serverGotMessage, halfClosed, errMessageAfterHalfClose},
		{"data after half-close", halfClosed | sent, serverGotData, halfClosed | sent, errDataAfterHalfClose},
		{"message after the end", closed | sent, serverGotMessage, closed | sent, errLate},
		{"message after half-close and the end", closed | sent | halfClosed, serverGotMessage, closed | sent | halfClosed, errLate},
		{"half-close", sent, serverGotHalfClose, sent | halfClosed, nil},
		{"half-close twice", halfClosed, serverGotHalfClose, halfClosed, nil},
		{"half-close after the end", closed | sent, serverGotHalfClose, closed | sent, errLate},
		{"cancel", open, serverGotCancel, closed, nil},
		{"cancel after the end", closed | sent, serverGotCancel, closed | sent, errLate},
		{"set headers", halfClosed, serverSetHeader, halfClosed, nil},
		{"set headers once sent", sent, serverSetHeader, sent, errHeadersSent},
		{"set headers after a cancel", closed, serverSetHeader, closed, errHeadersSent},
		{"send headers", open, serverSendHeader, sent, nil},
		{"send headers twice", sent, serverSendHeader, sent, errLate},
		{"send headers sent before a cancel", sent | closed, serverSendHeader, sent | closed, errLate},
		{"send headers after a cancel", closed, serverSendHeader, closed, errHeadersAfterCancel},
		{"set trailers", sent, serverSetTrailer, sent, nil},
		{"set trailers after the end", sent | closed, serverSetTrailer, sent | closed, errCallEnded},
		{"close sends the headers due", halfClosed, serverClose, halfClosed | sent | closed, nil},
		{"close after a cancel", closed, serverClose, closed, errLate},
	} {
		to, err := c.from.next(c.ev)
		if to != c.to || !errors.Is(err, c.err) || (err == nil) != (c.err == nil) {
			t.Errorf("%s: next(%b, %d) = %b, %v; want %b, %v", c.name, c.from, c.ev, to, err, c.to, c.err)
		}
	}
}
