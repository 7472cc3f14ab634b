package tunnel

import (
	"errors"
	"testing"
)

// TestClientStateTable checks clientState.next against the protocol's rules
// for one call, as its client sees them.
func TestClientStateTable(t *testing.T) {
	const (
		awaiting   = callAwaitingHeaders
		receiving  = callReceiving
		ended      = callEnded
		halfClosed = callHalfClosed
		finished   = callFinished
	)
	for _, c := range []struct {
		name string
		from clientState
		ev   clientEvent
		to   clientState
		err  error // nil, errLate or the broken rule
	}{
		{"headers first", awaiting, clientGotHeaders, receiving, nil},
		{"headers twice", receiving, clientGotHeaders, receiving, errHeadersTwice},
		{"headers after the end", ended, clientGotHeaders, ended, errLate},
		{"message ends skipped headers", awaiting, clientGotMessage, receiving, nil},
		{"message after headers", receiving, clientGotMessage, receiving, nil},
		{"message after the end", ended, clientGotMessage, ended, errLate},
		{"data is inbound's to judge", awaiting, clientGotData, awaiting, nil},
		{"data after the end", ended | halfClosed, clientGotData, ended | halfClosed, errLate},
		{"trailers-only response", awaiting, clientGotClose, ended, nil},
		{"close after messages", receiving | halfClosed, clientGotClose, ended | halfClosed, nil},
		{"close after the end", ended, clientGotClose, ended, errLate},
		{"abort", receiving, clientAborted, ended, nil},
		{"abort after the end", ended, clientAborted, ended, errLate},
		{"send", receiving, clientSendMsg, receiving, nil},
		{"send after CloseSend", halfClosed, clientSendMsg, halfClosed, errSendAfterCloseSend},
		{"send after CloseSend and the end", ended | halfClosed, clientSendMsg, ended | halfClosed, errSendAfterCloseSend},
		{"send after the end", ended, clientSendMsg, ended, errLate},
		{"CloseSend", receiving, clientCloseSend, receiving | halfClosed, nil},
		{"CloseSend after the end", ended, clientCloseSend, ended | halfClosed, nil},
		{"CloseSend twice", halfClosed, clientCloseSend, halfClosed, errLate},
		{"finish", ended | halfClosed, clientFinish, ended | halfClosed | finished, nil},
		{"finish twice", ended | finished, clientFinish, ended | finished, errLate},
	} {
		to, err := c.from.next(c.ev)
		if to != c.to || !errors.Is(err, c.err) || (err == nil) != (c.err == nil) {
			t.Errorf("%s: next(%b, %d) = %b, %v; want %b, %v", c.name, c.from, c.ev, to, err, c.to, c.err)
		}
	}
}
