package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
)

// RefusalReason says why the gateway refused an agent's tunnel, a caller's
// call or a client's connection. The reasons are a fixed set, so that
// they can label a metric and be alerted on: the gateway logs each
// refusal with its reason and counts it in
// grpctunnel_gateway_refused_total{who, reason}.
type RefusalReason string

// The reasons a refusal is logged and counted under. who is "agent" for
// tunnels, "caller" for calls and "connection" for TLS handshakes, which
// fail before the gateway can tell an agent from a caller.
const (
	// ReasonNoToken: the agent or caller presented no token.
	ReasonNoToken RefusalReason = "no_token"
	// ReasonBadToken: the token presented is malformed or unknown.
	ReasonBadToken RefusalReason = "bad_token"
	// ReasonKeyNotAllowed: the token or client certificate presented does
	// not allow the agent key announced or called.
	ReasonKeyNotAllowed RefusalReason = "key_not_allowed"
	// ReasonNoCertificate: a verified client certificate was required and
	// none was presented.
	ReasonNoCertificate RefusalReason = "no_certificate"
	// ReasonUnauthenticated: an authorization function refused with
	// Unauthenticated without saying why (see Refuse).
	ReasonUnauthenticated RefusalReason = "unauthenticated"
	// ReasonDenied: an authorization function refused with any other
	// error without saying why (see Refuse).
	ReasonDenied RefusalReason = "denied"
	// ReasonBadKey: an agent announced no key, several, or one that is
	// not a valid key.
	ReasonBadKey RefusalReason = "bad_key"
	// ReasonForwardTunnel: a client asked for a forward tunnel, which the
	// gateway does not serve.
	ReasonForwardTunnel RefusalReason = "forward_tunnel"
	// ReasonTooManyTunnels: the agent's key, or the gateway, holds as many
	// tunnels as Options.Tunnel allows.
	ReasonTooManyTunnels RefusalReason = "too_many_tunnels"
	// ReasonUntrustedCertificate: the client's certificate failed
	// verification (unknown issuer, expired, wrong usage).
	ReasonUntrustedCertificate RefusalReason = "untrusted_certificate"
	// ReasonPlaintext: the client did not speak TLS on the TLS port,
	// usually a plaintext gRPC client.
	ReasonPlaintext RefusalReason = "plaintext"
	// ReasonTLSHandshake: any other failed TLS handshake, such as a client
	// that hung up (a TCP probe) or offered nothing the gateway accepts.
	ReasonTLSHandshake RefusalReason = "tls_handshake"
)

// Who is refused: the who label of the refusal metric.
const (
	whoAgent      = "agent"
	whoCaller     = "caller"
	whoConnection = "connection"
)

// refusalMessages are the messages of the refusals' log lines, by who.
var refusalMessages = map[string]string{
	whoAgent:      "agent refused",
	whoCaller:     "caller refused",
	whoConnection: "TLS handshake refused",
}

// refusalKind is one label pair of the refusal counter.
type refusalKind struct {
	who    string
	reason RefusalReason
}

// refusalKinds are every label pair the counter can have, so that each
// series exists, at zero, from the start: a rate alert then sees the first
// refusal too.
var refusalKinds = func() []refusalKind {
	var kinds []refusalKind
	app := []RefusalReason{ReasonNoToken, ReasonBadToken, ReasonKeyNotAllowed, ReasonNoCertificate, ReasonUnauthenticated, ReasonDenied}
	for _, r := range append(app, ReasonBadKey, ReasonForwardTunnel, ReasonTooManyTunnels) {
		kinds = append(kinds, refusalKind{whoAgent, r})
	}
	for _, r := range app {
		kinds = append(kinds, refusalKind{whoCaller, r})
	}
	for _, r := range []RefusalReason{ReasonUntrustedCertificate, ReasonNoCertificate, ReasonPlaintext, ReasonTLSHandshake} {
		kinds = append(kinds, refusalKind{whoConnection, r})
	}
	return kinds
}()

// Refuse marks err, the refusal an AuthorizeAgent or AuthorizeCall function
// returns, with the reason the gateway logs and counts it under. The caller
// or agent still receives err's status (PermissionDenied if err is not a
// status). Without Refuse a refusal counts as ReasonUnauthenticated or
// ReasonDenied, by its code; a reason that does not apply (a TLS reason,
// or a tunnel's for a call) does too.
func Refuse(reason RefusalReason, err error) error {
	if err == nil {
		return nil
	}
	return &refusedError{reason: reason, err: err}
}

// refusedError is an error marked by Refuse. It answers GRPCStatus itself
// so that gRPC sends the status of the error it marks, message and all.
type refusedError struct {
	reason RefusalReason
	err    error
}

func (e *refusedError) Error() string { return e.err.Error() }

func (e *refusedError) Unwrap() error { return e.err }

func (e *refusedError) GRPCStatus() *status.Status {
	if st, ok := status.FromError(e.err); ok {
		return st
	}
	return status.New(codes.PermissionDenied, e.err.Error())
}

// reasonOf is the reason to count err under for who.
func reasonOf(who string, err error) RefusalReason {
	var r *refusedError
	if errors.As(err, &r) {
		for _, k := range refusalKinds {
			if k.who == who && k.reason == r.reason {
				return r.reason
			}
		}
	}
	if status.Code(err) == codes.Unauthenticated {
		return ReasonUnauthenticated
	}
	return ReasonDenied
}

// refusalLogInterval is how often at most each kind of refusal is logged:
// a client that fails a thousand times a second costs a line a second, and
// that line says how many were left out.
const refusalLogInterval = time.Second

// maxLoggedText bounds the error text a refusal's line repeats: the
// statuses may hold what the client sent.
const maxLoggedText = 256

// refusals logs and counts what the gateway refuses.
type refusals struct {
	log *slog.Logger
	now func() time.Time // time.Now, but for tests of the limit

	mu    sync.Mutex
	kinds map[refusalKind]*refusalState

	recent refusalRing // the last refusals, for RecentRefusals
}

// refusalState is one kind of refusal's counter and log limiter.
type refusalState struct {
	counter    prometheus.Counter // nil without metrics
	logged     time.Time          // when its last line was written
	suppressed int                // refusals since then not logged
}

func newRefusals(log *slog.Logger, m *metrics) *refusals {
	r := &refusals{log: log, now: time.Now, kinds: make(map[refusalKind]*refusalState, len(refusalKinds))}
	for _, k := range refusalKinds {
		st := &refusalState{}
		if m != nil {
			st.counter = m.refused.WithLabelValues(k.who, string(k.reason))
		}
		r.kinds[k] = st
	}
	return r
}

// refuse counts a refusal and logs it, unless a line of its kind was
// written less than refusalLogInterval ago. attrs describe the refused
// party; err is what it was told.
func (r *refusals) refuse(who string, reason RefusalReason, err error, attrs ...slog.Attr) {
	st := r.kinds[refusalKind{who, reason}]
	if st == nil {
		// Not a kind the table knows: a mistake here, not the client's.
		st = r.kinds[refusalKind{who, ReasonDenied}]
	}
	if st.counter != nil {
		st.counter.Inc()
	}
	now := r.now()
	r.recent.add(now, who, reason, err, attrs)
	r.mu.Lock()
	if !st.logged.IsZero() && now.Sub(st.logged) < refusalLogInterval {
		st.suppressed++
		r.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	st.logged, st.suppressed = now, 0
	r.mu.Unlock()

	level := slog.LevelWarn
	if reason == ReasonTLSHandshake {
		// Probes and scanners that hang up are routine, not alarming.
		level = slog.LevelInfo
	}
	attrs = append(attrs, slog.String("reason", string(reason)))
	if err != nil {
		msg := err.Error()
		if st, ok := status.FromError(err); ok {
			msg = st.Message()
		}
		attrs = append(attrs, slog.String("err", bounded(msg, maxLoggedText)))
	}
	if suppressed > 0 {
		attrs = append(attrs, slog.Int("suppressed", suppressed))
	}
	r.log.LogAttrs(context.Background(), level, refusalMessages[who], attrs...)
}

// peerAttrs describe the client of ctx: its address and its verified
// certificate's subject, if any.
func peerAttrs(ctx context.Context) []slog.Attr {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return nil
	}
	attrs := []slog.Attr{slog.String("peer", p.Addr.String())}
	if id := identity(p.AuthInfo); id != "" {
		attrs = append(attrs, slog.String("identity", id))
	}
	return attrs
}

// bounded cuts s to at most n bytes, at a character boundary, saying so.
// Unlike errtext.Quote it does not quote: slog escapes what it writes.
func bounded(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

// Credentials wraps a server's transport credentials so that the gateway
// logs and counts the TLS handshakes that fail, by reason (see
// RefusalReason): untrusted or missing client certificates and plaintext
// clients. gRPC drops those connections inside its transport, where no
// interceptor sees them, so without this they leave no trace. Pass the
// result to grpc.Creds.
func (g *Gateway) Credentials(creds credentials.TransportCredentials) credentials.TransportCredentials {
	return observedCreds{TransportCredentials: creds, refusals: g.refusals}
}

// observedCreds are transport credentials whose failed server handshakes
// are refusals.
type observedCreds struct {
	credentials.TransportCredentials
	refusals *refusals
}

func (c observedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		reason, attrs := handshakeFailure(err)
		attrs = append(attrs, slog.String("peer", raw.RemoteAddr().String()))
		c.refusals.refuse(whoConnection, reason, err, attrs...)
	}
	return conn, info, err
}

func (c observedCreds) Clone() credentials.TransportCredentials {
	return observedCreds{TransportCredentials: c.TransportCredentials.Clone(), refusals: c.refusals}
}

// handshakeFailure classifies a failed server handshake, with what the
// error tells of the client.
func handshakeFailure(err error) (RefusalReason, []slog.Attr) {
	var verify *tls.CertificateVerificationError
	var record tls.RecordHeaderError
	switch {
	case errors.As(err, &verify):
		var attrs []slog.Attr
		if len(verify.UnverifiedCertificates) > 0 {
			// The client chose this name: bounded, and marked unverified.
			subject := verify.UnverifiedCertificates[0].Subject.String()
			attrs = append(attrs, slog.String("unverified_subject", bounded(subject, errtext.MaxQuoted)))
		}
		return ReasonUntrustedCertificate, attrs
	case errors.As(err, &record):
		return ReasonPlaintext, nil
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		// crypto/tls has no error type for it, only this text.
		return ReasonNoCertificate, nil
	}
	return ReasonTLSHandshake, nil
}
