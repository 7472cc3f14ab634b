package proxy

import (
	"google.golang.org/grpc/status"
)

// Responder decides how the results of a fanned-out call reach the client,
// in place of the default labels: what each backend's response messages
// become, what a backend's failure becomes, and, for a unary method, how
// the results merge into the one response a unary client expects. Use one
// for services that already follow a convention for one-to-many results,
// such as Talos's ([TalosResponder]), so that their clients need no
// changes. Set it for a handler with [WithResponder], or for one call in
// [Route.Responder].
//
// The functions run concurrently, one goroutine per backend, and must not
// block: the backend's next messages wait for them. A nil function has the
// effect its documentation says.
type Responder struct {
	// Message returns what the client receives for msg, one response
	// message of backend b, in the order b sent them: msg changed in
	// place, a new slice, or nil to send nothing. msg is the Responder's,
	// to change or keep. unary is the route's Unary. An error fails b's
	// call, and it is reported with Failure, with code Internal; b's
	// further messages are not read. A nil Message sends msg unchanged.
	Message func(b Backend, unary bool, msg []byte) ([]byte, error)
	// Failure returns the message that tells the client that b's call
	// ended with st (including a call that could not start, a Backend with
	// a nil Conn, and a Message error), or nil to send nothing; a backend
	// that ends with OK is not reported. st is what [WithBackendErrors]
	// made of the backend's status. A nil Failure sends nothing: the client
	// can still count failures in the trailers (see
	// [FanOutFailedTrailer]).
	Failure func(b Backend, unary bool, st *status.Status) []byte
	// Merge, if set, makes a fanned-out unary call (a Route with Unary
	// set) answer with one message: what Merge returns from every message
	// Message and Failure returned, grouped by backend in the route's
	// order, each backend's in the order it sent them. It is called once
	// every backend's call has ended, unless the client has gone; an error
	// fails the call with Internal. Without Merge, or for a call that is
	// not unary, the messages are sent as they come.
	Merge func(msgs [][]byte) ([]byte, error)
}

// WithResponder makes fanned-out calls reach the client as r decides,
// instead of with labels, unless a Route names its own Responder. Use it
// when every fanned-out service follows one convention, such as Talos's
// ([TalosResponder]).
func WithResponder(r *Responder) Option {
	return func(o *options) { o.responder = r }
}

// Trailers that a fanned-out call ends with, whatever makes its results
// (labels or a [Responder]), so that a client can tell how many backends
// failed without reading every result, or when the Responder reports
// failures with nothing at all. The values are decimal numbers.
const (
	// FanOutBackendsTrailer holds the number of backends the call fanned
	// out to.
	FanOutBackendsTrailer = "grpctunnel-fanout-backends"
	// FanOutFailedTrailer holds the number of those backends whose calls
	// ended with an error, including those that could not start.
	FanOutFailedTrailer = "grpctunnel-fanout-failed"
)
