package gateway

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRefusalLogIsBounded: a client refused over and over costs one line
// a second for its kind of refusal, which says how many it left out, and
// the caller's text it repeats is cut.
func TestRefusalLogIsBounded(t *testing.T) {
	var buf bytes.Buffer
	r := newRefusals(slog.New(slog.NewTextHandler(&buf, nil)), nil)
	now := time.Unix(1000, 0)
	r.now = func() time.Time { return now }
	long := status.Error(codes.Unauthenticated, strings.Repeat("x", 10000))

	for range 5 {
		r.refuse(whoCaller, ReasonBadToken, long)
	}
	r.refuse(whoAgent, ReasonBadToken, long) // another kind: a line of its own
	if n := strings.Count(buf.String(), "\n"); n != 2 {
		t.Fatalf("%d lines for 5 refusals of one kind and 1 of another, want 2:\n%s", n, buf.String())
	}
	if strings.Contains(buf.String(), "suppressed") {
		t.Errorf("the first lines say something was suppressed:\n%s", buf.String())
	}
	if len(buf.String()) > 2*(maxLoggedText+300) {
		t.Errorf("the lines repeat the whole error: %d bytes", len(buf.String()))
	}
	buf.Reset()
	now = now.Add(refusalLogInterval)
	r.refuse(whoCaller, ReasonBadToken, long)
	if got := buf.String(); strings.Count(got, "\n") != 1 || !strings.Contains(got, "suppressed=4") || !strings.Contains(got, "reason=bad_token") {
		t.Errorf("a second later: %s; want one line with suppressed=4", got)
	}
}

func TestReasonOf(t *testing.T) {
	for _, tc := range []struct {
		who  string
		err  error
		want RefusalReason
	}{
		{whoAgent, Refuse(ReasonKeyNotAllowed, status.Error(codes.PermissionDenied, "no")), ReasonKeyNotAllowed},
		{whoAgent, status.Error(codes.Unauthenticated, "no"), ReasonUnauthenticated},
		{whoCaller, errors.New("no"), ReasonDenied},
		// A reason that does not apply to who, or that is not one at all.
		{whoCaller, Refuse(ReasonTooManyTunnels, status.Error(codes.PermissionDenied, "no")), ReasonDenied},
		{whoAgent, Refuse("made-up", status.Error(codes.Unauthenticated, "no")), ReasonUnauthenticated},
	} {
		if got := reasonOf(tc.who, tc.err); got != tc.want {
			t.Errorf("reasonOf(%s, %v) = %s, want %s", tc.who, tc.err, got, tc.want)
		}
	}
	// Refuse keeps the status the client sees.
	err := Refuse(ReasonBadToken, status.Error(codes.Unauthenticated, "unknown token"))
	if st := status.Convert(err); st.Code() != codes.Unauthenticated || st.Message() != "unknown token" {
		t.Errorf("Refuse changed the status to %v", st)
	}
	if st := status.Convert(Refuse(ReasonDenied, errors.New("plain"))); st.Code() != codes.PermissionDenied || st.Message() != "plain" {
		t.Errorf("Refuse of a plain error: %v", st)
	}
}
