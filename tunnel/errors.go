package tunnel

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// unstartedError is the status of a call that never left this end: its
// tunnel was ending, draining or at its limit of calls before the call's
// first frame went out. A channel over several tunnels retries such a call
// on another tunnel, as gRPC retries a call that never left the client;
// anyone else sees the status alone.
type unstartedError struct{ st *status.Status }

func (e *unstartedError) Error() string              { return e.st.Err().Error() }
func (e *unstartedError) GRPCStatus() *status.Status { return e.st }

// unstarted marks err, a status, as the failure of a call that never left.
func unstarted(err error) error { return &unstartedError{st: status.Convert(err)} }

// neverLeft reports whether err is the failure of a call that never left
// this end, so that trying it elsewhere cannot run it twice.
func neverLeft(err error) bool {
	var u *unstartedError
	return errors.As(err, &u)
}

// endReason says in a few words why a tunnel ended with err, for the calls
// it carried: the tunnel's own failures keep their text, and the outer
// stream's generic errors are named for what they mean here.
func endReason(err error) string {
	if err == nil {
		return "closed"
	}
	var pe *protocolError
	if errors.As(err, &pe) {
		return "ended: " + strings.TrimPrefix(pe.Error(), "grpctunnel: ")
	}
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.Canceled) {
			return "closed: its context was cancelled"
		}
		return "failed: " + err.Error()
	}
	msg := strings.TrimPrefix(st.Message(), "grpctunnel: ")
	switch st.Code() {
	case codes.Canceled:
		// A network server's outer stream is cancelled when the peer's
		// connection goes, and gRPC says no more than that.
		return fmt.Sprintf("was lost: its connection closed or the peer abandoned it (%s)", msg)
	case codes.Unavailable:
		return fmt.Sprintf("was lost: %s", msg)
	case codes.DeadlineExceeded:
		return fmt.Sprintf("ended: the opening call's deadline passed (%s)", msg)
	}
	return fmt.Sprintf("failed: %s: %s", st.Code(), msg)
}

// tunnelFailedError is the status of a call whose tunnel failed under it:
// Unavailable, with the failure's text, and the failure as its cause for
// errors.Is and errors.As.
type tunnelFailedError struct {
	st    *status.Status
	cause error
}

func (e *tunnelFailedError) Error() string              { return e.st.Err().Error() }
func (e *tunnelFailedError) GRPCStatus() *status.Status { return e.st }
func (e *tunnelFailedError) Unwrap() error              { return e.cause }

// tunnelFailed is the status of a call that could not send because its
// tunnel failed with cause.
func tunnelFailed(cause error) error {
	msg := cause.Error()
	if s, ok := status.FromError(cause); ok {
		msg = s.Message()
	}
	return &tunnelFailedError{
		st:    status.New(codes.Unavailable, "grpctunnel: tunnel failed: "+strings.TrimPrefix(msg, "grpctunnel: ")),
		cause: cause,
	}
}
