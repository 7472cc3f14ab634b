package tunnel

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// TestErrorsKeepTheirCause checks that the package's errors built from
// another keep it: in the text, and for errors.Is where they can wrap.
func TestErrorsKeepTheirCause(t *testing.T) {
	broke := errors.New("connection reset")
	err := tunnelFailed(broke)
	if status.Code(err) != codes.Unavailable || !errors.Is(err, broke) || status.Convert(err).Message() != "grpctunnel: tunnel failed: connection reset" {
		t.Errorf("tunnelFailed(%v) = %v (code %v, is cause %v)", broke, err, status.Code(err), errors.Is(err, broke))
	}
	// A cause that is a status of this package is not prefixed twice.
	err = tunnelFailed(errQueueFull)
	if msg := status.Convert(err).Message(); strings.Count(msg, "grpctunnel:") != 1 || !strings.Contains(msg, "does not read the frames") {
		t.Errorf("tunnelFailed(errQueueFull) message %q", msg)
	}
	if err := windowOverrun(flowcontrol.ErrOverrun); status.Code(err) != codes.ResourceExhausted || !errors.Is(err, flowcontrol.ErrOverrun) {
		t.Errorf("windowOverrun = %v", err)
	}
	if err := windowOverflow(flowcontrol.ErrOverflow); status.Code(err) != codes.Internal || !errors.Is(err, flowcontrol.ErrOverflow) {
		t.Errorf("windowOverflow = %v", err)
	}
	if err := unstarted(errTooManyStreams); !neverLeft(err) || !errors.Is(err, errTooManyStreams) || status.Code(err) != codes.ResourceExhausted {
		t.Errorf("unstarted(errTooManyStreams) = %v", err)
	}
}

// TestErrorTexts checks that every error value of the package says where
// it comes from.
func TestErrorTexts(t *testing.T) {
	for _, err := range []error{
		ErrServerStopped, ErrGivenBack, errTunnelClosed, errPeerClosed, errPoolClosed,
		errShuttingDown, errTooManyStreams, errTooManyForKey, errBudget, errQueueFull,
		errStreamClosed, errDone, protocolErrorf("x"),
	} {
		msg := err.Error()
		if s, ok := status.FromError(err); ok {
			msg = s.Message()
		}
		if !strings.HasPrefix(msg, "grpctunnel: ") {
			t.Errorf("%q does not start with grpctunnel:", msg)
		}
	}
}
