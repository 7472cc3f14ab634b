package tunnel

// Every error value and error constructor of the package is here, so that
// their texts can be read, and kept consistent, in one place. Each message
// starts with "grpctunnel: ", except where grpc.Server's own text is kept on
// purpose (see services.lookup). An error caused by another keeps it: as a
// wrapped error where the caller may test for it, and in the text of a
// status, which cannot wrap.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrServerStopped is returned by ReverseTunnelServer.Serve once the server
// has been stopped.
var ErrServerStopped = errors.New("grpctunnel: reverse tunnel server stopped")

// ErrGivenBack is wrapped in the Err of the TunnelWaiting change that
// follows a tunnel given back by its client: refused by
// ReconnectOptions.Admit or ended with StateChange.GiveBack. It marks an
// end the client chose, not a failure: the server was reachable and took
// the tunnel, so nothing needs to be reported as an outage.
var ErrGivenBack = errors.New("grpctunnel: tunnel given back by the client")

// The ends of a tunnel.
var (
	// errTunnelClosed fails the sends of a tunnel that has ended, and the
	// opening of a call on a tunnel that is closed or draining.
	errTunnelClosed = errors.New("grpctunnel: tunnel closed")
	// errPeerClosed ends a tunnel whose network server asked for the end
	// with the tunnel-close extension; it is a clean end.
	errPeerClosed = errors.New("grpctunnel: tunnel closed by the peer")
	// errPoolClosed ends a reverse tunnel that ended before it joined its
	// handler's pool.
	errPoolClosed = errors.New("grpctunnel: tunnel ended before it joined the pool")
	// errShuttingDown refuses new tunnels and calls once a handler is
	// shutting down.
	errShuttingDown = status.Error(codes.Unavailable, "grpctunnel: server is shutting down")
)

// shuttingDownMessage is the message of errShuttingDown, by which a
// reconnecting client recognises the refusal.
var shuttingDownMessage = status.Convert(errShuttingDown).Message()

// Limits a peer or a caller ran into.
var (
	errTooManyStreams = status.Error(codes.ResourceExhausted, "grpctunnel: too many calls in progress on the tunnel (see WithMaxConcurrentStreams)")
	errTooManyForKey  = status.Error(codes.ResourceExhausted, "grpctunnel: too many reverse tunnels for this affinity key (see MaxReverseTunnelsPerKey)")
	errBudget         = status.Error(codes.ResourceExhausted, "grpctunnel: the tunnel holds as much unread data as it may (see WithMaxBufferedBytes)")
	// errQueueFull fails a tunnel whose peer lets the control frames it
	// makes this end send pile up unread (see maxQueued).
	errQueueFull = status.Error(codes.ResourceExhausted, "grpctunnel: the peer does not read the frames it makes this end send")
)

// The end of one call.
var (
	// errStreamClosed is what a handler's RecvMsg returns once its call is
	// over.
	errStreamClosed = status.Error(codes.Canceled, "grpctunnel: call is over")
	// errDone is returned by inbound.recv when the caller's done channel
	// closes first; the caller knows why it gave up, and reports that
	// instead, so this text is never seen.
	errDone = errors.New("grpctunnel: receive abandoned")
	// errLate is a stream's state machine's answer to an event that finds
	// the stream past it: a frame for a call that has ended (it raced with
	// the end), a second CloseSend, headers that went out already. The
	// event changes nothing and is nobody's error, so this text is never
	// seen.
	errLate = errors.New("grpctunnel: stream is past this event")
)

// A peer or a caller that breaks the rules of one call (see the state
// machines in client_state.go and server_state.go).
var (
	// errHeadersTwice ends a call whose server sent response headers after
	// headers or a message.
	errHeadersTwice = status.Error(codes.Internal, "grpctunnel: response headers received twice or after a message")
	// errSendAfterCloseSend is what SendMsg returns once the caller has
	// half-closed.
	errSendAfterCloseSend = status.Error(codes.Internal, "grpctunnel: SendMsg called after CloseSend")
	// errMessageAfterHalfClose and errDataAfterHalfClose end a call whose
	// client sent a request after half-closing.
	errMessageAfterHalfClose = status.Error(codes.Internal, "grpctunnel: request message after half-close")
	errDataAfterHalfClose    = status.Error(codes.Internal, "grpctunnel: request data after half-close")
	// errHalfCloseMidMessage ends a call whose client half-closed with a
	// request message incomplete.
	errHalfCloseMidMessage = status.Error(codes.Internal, "grpctunnel: half-close in the middle of a request message")
	// errCancelledByClient is the status of a call the client cancelled.
	errCancelledByClient = status.Error(codes.Canceled, "grpctunnel: call cancelled by the client")
	// errHeadersSent is what SetHeader and SendHeader return once the
	// headers can no longer change.
	errHeadersSent = status.Error(codes.Internal, "grpctunnel: headers already sent")
	// errCallEnded is what SetTrailer returns once the call is over.
	errCallEnded = status.Error(codes.Internal, "grpctunnel: call already ended")
	// errHeadersAfterCancel is what sending headers returns once the
	// client cancelled the call: the handler's context's status, as the
	// handler's other sends report it.
	errHeadersAfterCancel = status.FromContextError(context.Canceled).Err()
)

// tunnelFailure is the tunnel's end when err broke the outer stream: nil
// for the stream's clean end (io.EOF), else err itself.
func tunnelFailure(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// protocolError is a violation of the protocol by the peer; it ends the
// tunnel.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return "grpctunnel: protocol error: " + e.msg }

// GRPCStatus makes a protocol error end the outer RPC with Internal.
func (e *protocolError) GRPCStatus() *status.Status { return status.New(codes.Internal, e.Error()) }

func protocolErrorf(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

// causedError is a status that keeps the error that caused it, for
// errors.Is and errors.As; its text names the cause too.
type causedError struct {
	st    *status.Status
	cause error
}

func (e *causedError) Error() string              { return e.st.Err().Error() }
func (e *causedError) GRPCStatus() *status.Status { return e.st }
func (e *causedError) Unwrap() error              { return e.cause }

// withCause returns a status error of code c whose message is msg followed
// by the cause's text, and that unwraps to cause.
func withCause(c codes.Code, msg string, cause error) error {
	text := cause.Error()
	if s, ok := status.FromError(cause); ok {
		text = s.Message()
	}
	return &causedError{
		st:    status.New(c, "grpctunnel: "+msg+": "+strings.TrimPrefix(text, "grpctunnel: ")),
		cause: cause,
	}
}

// tunnelFailed is the status of a call that could not send because its
// tunnel failed with cause: Unavailable, naming the cause.
func tunnelFailed(cause error) error {
	return withCause(codes.Unavailable, "tunnel failed", cause)
}

// windowOverrun is the status of a call whose peer sent more than its
// window allowed; it unwraps to the window's report, cause
// (flowcontrol.ErrOverrun), which its text already says in the protocol's
// terms.
func windowOverrun(cause error) error {
	return &causedError{
		st:    status.New(codes.ResourceExhausted, "grpctunnel: peer sent more data than the flow-control window allows"),
		cause: cause,
	}
}

// windowOverflow is the status of a call whose peer's window updates
// overflow the send window; it unwraps to the window's report, cause
// (flowcontrol.ErrOverflow).
func windowOverflow(cause error) error {
	return &causedError{
		st:    status.New(codes.Internal, "grpctunnel: peer's window update overflows the send window"),
		cause: cause,
	}
}

// unstartedError is the status of a call that never left this end: its
// tunnel was ending, draining or at its limit of calls before the call's
// first frame went out. A channel over several tunnels retries such a call
// on another tunnel, as gRPC retries a call that never left the client;
// anyone else sees the status alone.
type unstartedError struct {
	st    *status.Status
	cause error // the error marked, kept for errors.Is and errors.As
}

func (e *unstartedError) Error() string              { return e.st.Err().Error() }
func (e *unstartedError) GRPCStatus() *status.Status { return e.st }
func (e *unstartedError) Unwrap() error              { return e.cause }

// unstarted marks err, a status, as the failure of a call that never left.
func unstarted(err error) error { return &unstartedError{st: status.Convert(err), cause: err} }

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
