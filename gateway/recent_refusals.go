package gateway

import (
	"log/slog"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
)

// maxRecentRefusals is how many refusals the gateway remembers for
// RecentRefusals: enough to see who keeps knocking, few enough that a
// flood of refusals costs a fixed, small amount of memory.
const maxRecentRefusals = 50

// Refusal is one refused agent tunnel, caller's call or TLS handshake, as
// RecentRefusals reports it. The metric counts refusals by reason; a
// Refusal says who it was. Every field but Time, Who and Reason comes
// from the refused client, so those fields are quoted and cut with
// errtext.Quote: bounded, with control characters escaped.
type Refusal struct {
	// Time is when the gateway refused.
	Time time.Time
	// Who is "agent" for a tunnel, "caller" for a call and "connection"
	// for a TLS handshake, as in grpctunnel_gateway_refused_total.
	Who string
	// Reason is why.
	Reason RefusalReason
	// Peer is the client's network address, if known.
	Peer string
	// Identity is the subject of the client's verified certificate,
	// quoted; for a certificate that failed verification it is the
	// subject the certificate claims, after "unverified ".
	Identity string
	// Key is the agent key announced (for a tunnel) or called, quoted.
	Key string
	// Method is the full name of the refused call, quoted.
	Method string
	// Error is the message the client was told (or the handshake's
	// error), quoted.
	Error string
}

// refusalRing holds the last maxRecentRefusals refusals, oldest
// overwritten first.
type refusalRing struct {
	mu   sync.Mutex
	buf  []Refusal // len up to maxRecentRefusals
	next int       // where the next one goes once buf is full
}

// add records a refusal of who for reason, described by the attributes
// refuse logs (peerAttrs and the like) and err.
func (r *refusalRing) add(now time.Time, who string, reason RefusalReason, err error, attrs []slog.Attr) {
	rf := Refusal{Time: now, Who: who, Reason: reason}
	for _, a := range attrs {
		v := a.Value.String()
		switch a.Key {
		case "peer":
			rf.Peer = v
		case "identity":
			rf.Identity = errtext.Quote(v)
		case "unverified_subject":
			rf.Identity = "unverified " + errtext.Quote(v)
		case "key":
			rf.Key = errtext.Quote(v)
		case "method":
			rf.Method = errtext.Quote(v)
		}
	}
	if err != nil {
		msg := err.Error()
		if st, ok := status.FromError(err); ok {
			msg = st.Message()
		}
		rf.Error = errtext.Quote(msg)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.buf) < maxRecentRefusals {
		r.buf = append(r.buf, rf)
		return
	}
	r.buf[r.next] = rf
	r.next = (r.next + 1) % maxRecentRefusals
}

// list returns the refusals held, newest first.
func (r *refusalRing) list() []Refusal {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Refusal, 0, len(r.buf))
	out = append(out, r.buf[r.next:]...)
	out = append(out, r.buf[:r.next]...)
	slices.Reverse(out)
	return out
}

// RecentRefusals returns the last refusals of agents, callers and TLS
// handshakes (at most 50), newest first. The log writes at most a line a
// second per kind of refusal and the metric counts only reasons; this is
// what tells an operator, or the dashboard, who was refused just now.
func (g *Gateway) RecentRefusals() []Refusal {
	return g.refusals.recent.list()
}
