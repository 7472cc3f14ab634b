package tunnel

// Every error value and error constructor of the package is here, so that
// their texts can be read, and kept consistent, in one place. Each message
// starts with "grpctunnel: ", except an inner error that a caller here
// wraps in one that has it (those of metadata, grpc-timeout and revision
// negotiation, and the reason of a tunnel given back). An error caused by
// another keeps it: as a wrapped error where the caller may test for it,
// and in the text of a status, which cannot wrap.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
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

// A tunnel a call cannot use, and the refusals of a tunnel server.
var (
	// errNoForwardServices refuses a forward tunnel on a server with
	// neither services nor an unknown-service handler.
	errNoForwardServices = status.Error(codes.Unimplemented, "grpctunnel: this server has no services for forward tunnels")
	// errNoReverseTunnels refuses a reverse tunnel on a server configured
	// with NoReverseTunnels.
	errNoReverseTunnels = status.Error(codes.Unimplemented, "grpctunnel: this server does not accept reverse tunnels")
	// errTooManyReverse refuses a reverse tunnel once the server holds
	// MaxReverseTunnels; the gateway recognises it by "(see
	// MaxReverseTunnels".
	errTooManyReverse = status.Error(codes.ResourceExhausted, "grpctunnel: this server holds as many reverse tunnels as it may (see MaxReverseTunnels)")
)

// errKeyNotComparable refuses a reverse tunnel whose AffinityKey returned
// key, which cannot be a map key.
func errKeyNotComparable(key any) error {
	return status.Errorf(codes.Internal, "grpctunnel: affinity key of type %T is not comparable", key)
}

// errTunnelShuttingDown is the status of a call on the tunnel described by
// desc that is shutting down but has not ended yet.
func errTunnelShuttingDown(desc string) error {
	return status.Errorf(codes.Unavailable, "grpctunnel: %s is shutting down", desc)
}

// errTunnelEnded is the status of a call on the tunnel described by desc,
// which ended with cause: Unavailable, saying how (see endReason).
func errTunnelEnded(desc string, cause error) error {
	return status.Errorf(codes.Unavailable, "grpctunnel: %s %s", desc, endReason(cause))
}

// errAllReverseBusy is the status of a call for which every reverse tunnel
// (for the affinity key named by forKey, if any) is at its limit of calls.
func errAllReverseBusy(forKey string) error {
	return status.Errorf(codes.ResourceExhausted, "grpctunnel: every reverse tunnel%s is at its limit of calls in progress (see WithMaxConcurrentStreams)", forKey)
}

// errNoReverseTunnel is the status of a call that does not wait for a
// reverse tunnel (for the affinity key named by forKey, if any) and finds
// none open.
func errNoReverseTunnel(forKey string) error {
	return status.Errorf(codes.Unavailable, "grpctunnel: no reverse tunnel is open%s", forKey)
}

// errGivenBackFor is the Err of the TunnelWaiting change that follows a
// tunnel given back by its client for reason: it wraps both ErrGivenBack
// and the reason.
func errGivenBackFor(reason error) error {
	return fmt.Errorf("%w: %w", ErrGivenBack, reason)
}

// errNoReasonGiven is the reason of a tunnel given back with a nil one. It
// is only seen wrapped by errGivenBackFor, which gives it its prefix.
var errNoReasonGiven = errors.New("no reason given")

// The protocol revision of a tunnel or of a call.

// errNoCommonRevision is chooseRevision's answer when the peer supports
// none of mine; the caller makes it a protocol error, which gives it its
// prefix.
func errNoCommonRevision(peer, mine []tunnelpb.ProtocolRevision) error {
	return fmt.Errorf("no protocol revision in common: peer supports %v, this end %v", peer, mine)
}

// errUnsupportedRevision closes a call opened with a protocol revision the
// tunnel does not speak.
func errUnsupportedRevision(rev tunnelpb.ProtocolRevision) error {
	return status.Errorf(codes.Unimplemented, "grpctunnel: protocol revision %v is not supported on this tunnel", rev)
}

// The method a call names (see services.lookup).

// errMalformedMethod closes a call whose method name is not
// /service/method.
func errMalformedMethod(fullMethod string) error {
	return status.Errorf(codes.Unimplemented, "grpctunnel: malformed method name: %q", fullMethod)
}

// errUnknownService closes a call for a service that is not registered,
// when there is no unknown-service handler.
func errUnknownService(service string) error {
	return status.Errorf(codes.Unimplemented, "grpctunnel: unknown service %s", service)
}

// errUnknownMethod closes a call for a method its service does not have.
func errUnknownMethod(method, service string) error {
	return status.Errorf(codes.Unimplemented, "grpctunnel: unknown method %s for service %s", method, service)
}

// The number of messages of a call.
var (
	// errNoResponse ends a unary-response call whose server ended it
	// without a response.
	errNoResponse = status.Error(codes.Internal, "grpctunnel: server ended a unary-response call without a response")
	// errExtraResponse ends a unary-response call whose server sent a
	// second response.
	errExtraResponse = status.Error(codes.Internal, "grpctunnel: cardinality violation: more than one response for a unary-response call")
	// errSecondResponse is what sending a second response for a
	// unary-response method returns.
	errSecondResponse = status.Error(codes.Internal, "grpctunnel: more than one response for a unary-response method")
	// errNoRequest ends a call of a unary-request method whose client
	// half-closed without a request.
	errNoRequest = status.Error(codes.Internal, "grpctunnel: no request message for a unary-request method")
)

// The framing of a message in chunks (see inbound), which a peer breaks.
var (
	// errMessageStartedTwice ends a call whose peer started a message
	// before the previous one was complete.
	errMessageStartedTwice = status.Error(codes.Internal, "grpctunnel: new message started before the previous one completed")
	// errDataWithoutMessage ends a call whose peer sent a continuation
	// chunk with no message started.
	errDataWithoutMessage = status.Error(codes.Internal, "grpctunnel: message data received with no message started")
)

// errFirstChunkOverruns ends a call whose peer started a message of size
// bytes with a chunk of n, more than that.
func errFirstChunkOverruns(n int, size uint32) error {
	return status.Errorf(codes.Internal, "grpctunnel: message chunk of %d bytes overruns its declared size of %d", n, size)
}

// errChunkOverruns ends a call whose peer sent a continuation chunk that
// goes past the declared size of its message.
func errChunkOverruns(size int) error {
	return status.Errorf(codes.Internal, "grpctunnel: message chunk overruns the declared size of %d bytes", size)
}

// The size limits of messages and metadata. The gateway recognises
// errMessageTooLarge's text by "received request message larger than max"
// and "received response message larger than max".

// errMessageTooLarge ends a call whose peer declared a kind ("request" or
// "response") message of size bytes, more than limit.
func errMessageTooLarge(kind string, size uint32, limit int) error {
	return status.Errorf(codes.ResourceExhausted, "grpctunnel: received %s message larger than max (%d vs. %d)", kind, size, limit)
}

// errSendTooLarge is what sending a message of size bytes (as sent, after
// compression) returns when that is more than limit.
func errSendTooLarge(size, limit int) error {
	return status.Errorf(codes.ResourceExhausted, "grpctunnel: trying to send message larger than max (%d vs. %d)", size, limit)
}

// errDecompressedTooLarge ends a call whose message decompresses to more
// than max bytes.
func errDecompressedTooLarge(limit int) error {
	return status.Errorf(codes.ResourceExhausted, "grpctunnel: received message after decompression larger than max (more than %d bytes)", limit)
}

// errMetadataTooLarge ends a call whose peer sent metadata of size bytes,
// more than limit (see WithMaxHeaderListSize).
func errMetadataTooLarge(size, limit int) error {
	return status.Errorf(codes.ResourceExhausted, "grpctunnel: received metadata of %d bytes, more than the limit of %d (see WithMaxHeaderListSize)", size, limit)
}

// Codecs and compressors. A status cannot wrap, so these keep their cause
// in their text.

// errNoCodec fails a call whose content-subtype call option names a codec
// that is not registered.
func errNoCodec(subtype string) error {
	return status.Errorf(codes.Internal, "grpctunnel: no codec registered for content-subtype %q", subtype)
}

// errMarshal is what sending a message returns when the codec fails with
// cause.
func errMarshal(cause error) error {
	return status.Errorf(codes.Internal, "grpctunnel: error while marshaling: %v", cause)
}

// errUnmarshal ends a call whose side ("request" or "response") the codec
// fails to unmarshal with cause.
func errUnmarshal(side string, cause error) error {
	return status.Errorf(codes.Internal, "grpctunnel: failed to unmarshal the %s: %v", side, cause)
}

// errNoCompressor fails a call whose UseCompressor call option names a
// compressor that is not registered.
func errNoCompressor(name string) error {
	return status.Errorf(codes.Internal, "grpctunnel: compressor is not installed for requested grpc-encoding %q", name)
}

// errNoDecompressor ends a call whose peer compressed its messages with
// name, which is not registered here; code depends on the side that
// receives.
func errNoDecompressor(code codes.Code, name string) error {
	return status.Errorf(code, "grpctunnel: decompressor is not installed for grpc-encoding %q", name)
}

// errCompress is what sending a message returns when the compressor fails
// with cause.
func errCompress(cause error) error {
	return status.Errorf(codes.Internal, "grpctunnel: error while compressing: %v", cause)
}

// errDecompress ends a call whose message the decompressor fails on with
// cause.
func errDecompress(cause error) error {
	return status.Errorf(codes.Internal, "grpctunnel: failed to decompress the message: %v", cause)
}

// Metadata and the grpc-timeout header. encodeMetadata, decodeMetadata and
// decodeTimeout return the errors without a prefix; their callers make
// them a status with errMetadataOut or errHeaderIn, which adds it.

// errMetadataOut is the status of a call whose metadata cannot be sent,
// for cause.
func errMetadataOut(cause error) error {
	return status.Error(codes.Internal, "grpctunnel: "+cause.Error())
}

// errHeaderIn is the status of a call whose peer sent metadata, or a
// grpc-timeout, that cannot be decoded, for cause.
func errHeaderIn(cause error) error {
	return status.Error(codes.InvalidArgument, "grpctunnel: "+cause.Error())
}

// errMetadataNotUTF8 is encodeMetadata's refusal of the value of key, not
// valid UTF-8, for a peer that cannot take binary metadata.
func errMetadataNotUTF8(key string) error {
	return fmt.Errorf("metadata %q has a value that is not valid UTF-8, and the tunnel peer does not support binary metadata", key)
}

// errMetadataBase64 is decodeMetadata's refusal of a binary value of key
// that cause says is not base64.
func errMetadataBase64(key string, cause error) error {
	return fmt.Errorf("metadata %q: invalid base64 value: %w", key, cause)
}

// errMalformedTimeout is decodeTimeout's refusal of s.
func errMalformedTimeout(s string) error {
	return fmt.Errorf("malformed grpc-timeout %q", s)
}

// errTimeoutUnit is decodeTimeout's refusal of s, whose unit it does not
// know.
func errTimeoutUnit(s string) error {
	return fmt.Errorf("malformed grpc-timeout %q: unknown unit", s)
}

// errInsecureCredentials fails a call whose per-RPC credentials require
// transport security the tunnel's connection does not have.
var errInsecureCredentials = status.Error(codes.Unauthenticated, "grpctunnel: cannot send secure credentials over a tunnel whose connection is not secure")

// errCredentials fails a call whose per-RPC credentials failed with
// cause, which is not a status.
func errCredentials(cause error) error {
	return status.Errorf(codes.Unauthenticated, "grpctunnel: per-RPC credentials failed: %v", cause)
}

// errKeepalive ends a tunnel whose peer sent no frame for idle, past the
// keepalive's interval and timeout.
func errKeepalive(idle time.Duration) error {
	return status.Errorf(codes.Unavailable, "grpctunnel: keepalive: no frame from the peer for %v", idle.Round(time.Millisecond))
}

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
