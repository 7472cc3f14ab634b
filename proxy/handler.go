package proxy

import (
	"context"
	"errors"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/grpctunnel/grpctunnel/internal/workers"
)

// Director picks the backends for a call. It gets the call's context (with
// the incoming metadata and peer) and the call itself, and returns where the
// call goes and the metadata to send with it (typically a filtered copy of
// the incoming metadata). An error, ideally a gRPC status, fails the call
// without contacting any backend.
//
// The director runs before the first request message is read, so a client
// that waits for response headers before it sends does not deadlock, unless
// the director chooses to wait for that message with [Call.Peek].
type Director func(ctx context.Context, call *Call) (Route, error)

// Route is a director's decision: the backends that receive the call and
// the metadata sent to each of them.
type Route struct {
	// Backends receive the call. With one backend the call is forwarded
	// transparently (unless FanOut is set); with several it fans out and
	// every response is labelled with its backend, or made by the
	// Responder (see the package documentation). A route
	// with no backends fails the call with Unavailable, and so does a
	// backend with a nil Conn (in a fan-out, as that backend's result).
	Backends []Backend
	// Metadata is sent to every backend as the call's outgoing metadata.
	Metadata metadata.MD
	// FanOut makes a route with a single backend fan out as a route with
	// several does, instead of forwarding transparently, so that the
	// client gets responses of one shape (labelled, or as the Responder
	// makes them) whatever the number of backends: siderolabs/grpc-proxy's
	// One2Many mode with one node. It changes nothing for a route with
	// several backends. A route cannot both fan out and mirror: with
	// Mirrors or Finalize set, FanOut fails the call with Internal.
	FanOut bool
	// Unary says that the method is unary (neither side streams), which
	// the proxy cannot tell from the wire. When the call fans out and its
	// Responder has a Merge, the client then gets the results merged into
	// one response, so that a plain unary client can call the method.
	// Without a Merge it changes nothing but what the Responder's
	// functions are told. A director knows it from the method's
	// descriptor (protoregistry.GlobalFiles, say), or from a list.
	Unary bool
	// Responder, if not nil, decides how the backends' results reach the
	// client when this call fans out, in place of the one [WithResponder]
	// set for the handler (by default, labels).
	Responder *Responder

	// Mirrors, if set, make the call mirrored (see "Mirroring" in the
	// package documentation): Backends must then hold exactly one
	// backend, the primary, which alone answers the client, while every
	// mirror gets a copy of the requests. It is Gitaly praefect's
	// secondaries. A route cannot both fan out and mirror: with several
	// Backends, or FanOut set, a mirrored route fails the call with
	// Internal rather than picking one of the two; with none it fails
	// with Unavailable, as any route does.
	Mirrors []Mirror
	// Finalize, if set, runs once a mirrored call is over, primary and
	// mirrors, whatever its outcome; its error becomes the call's status
	// unless the call failed already. It is Gitaly praefect's request
	// finalizer: the place to wait for the replicas' votes, or to record
	// the outcome. ctx is the call's. Setting it makes the route mirrored
	// even with no Mirrors, so Backends must hold exactly one backend and
	// FanOut must be unset.
	Finalize func(ctx context.Context) error
}

// Backend is one destination of a call.
type Backend struct {
	// Name labels the backend's responses and errors when a call fans out
	// to several backends; it is not sent to the backend.
	Name string
	// Conn carries the call: a *grpc.ClientConn, a tunnel.TunnelChannel, a
	// reverse channel from tunnel.TunnelServiceHandler.KeyAsChannel, or any
	// other grpc.ClientConnInterface.
	Conn grpc.ClientConnInterface
}

// To routes a call to the one backend conn with the outgoing metadata md:
// the whole of a one-to-one director is often
//
//	return proxy.To(conn, md), nil
func To(conn grpc.ClientConnInterface, md metadata.MD) Route {
	return Route{Backends: []Backend{{Conn: conn}}, Metadata: md}
}

// Call is the call a Director routes.
type Call struct {
	method string
	stream grpc.ServerStream

	peeked  bool
	first   *Frame // the message Peek read, forwarded before any other
	peekErr error  // what reading it returned instead
}

// Method is the call's full method name, as "/package.Service/Method".
func (c *Call) Method() string { return c.method }

// Peek returns the call's first request message without consuming it: the
// message is still forwarded to the backends, first. It blocks until the
// message arrives, so only a director that needs the message's content
// should call it. It returns io.EOF if the client half-closed without
// sending a message, or the call's status if the call ended. The returned
// bytes belong to the proxy: read them, but neither change them nor keep
// them after the director returns.
func (c *Call) Peek() ([]byte, error) {
	if !c.peeked {
		c.peeked = true
		f := new(Frame)
		if err := c.stream.RecvMsg(f); err != nil {
			c.peekErr = err
		} else {
			c.first = f
		}
	}
	if c.peekErr != nil {
		return nil, c.peekErr
	}
	return c.first.view(), nil
}

// release frees a peeked message that was never forwarded.
func (c *Call) release() {
	if c.first != nil {
		c.first.free()
		c.first = nil
	}
}

// recv reads the next request message, starting with the peeked one.
func (c *Call) recv() (*Frame, error) {
	if c.peeked {
		c.peeked = false
		if c.peekErr != nil {
			return nil, c.peekErr
		}
		f := c.first
		c.first = nil
		return f, nil
	}
	f := new(Frame)
	if err := c.stream.RecvMsg(f); err != nil {
		return nil, err
	}
	return f, nil
}

// Option adjusts how [Handler] and [ServerOptions] forward calls, for a
// deployment whose needs differ from the defaults; see [WithLabelField].
type Option func(*options)

type options struct {
	labelField protowire.Number
	// callOpts apply to every backend call, the proxy's codec last.
	callOpts []grpc.CallOption
	// responder, if set, makes fanned-out results for routes that do not
	// name their own; nil means labels.
	responder *Responder
	// backendErr, if set, rewrites a backend's failure; see
	// WithBackendErrors.
	backendErr func(ctx context.Context, b Backend, err error) error
	// pumps copy requests to backends on goroutines kept from call to
	// call, whose stacks earlier calls already grew.
	pumps *workers.Pool[pump]
	// mirror holds the settings of mirrored calls (mirror.go), and
	// mirrorTasks runs their goroutines as pumps runs forwarded calls'.
	mirror      mirrorOptions
	mirrorTasks *workers.Pool[mirrorTask]
}

// pump is the request side of one forwarded call.
type pump struct {
	call *Call
	cs   grpc.ClientStream
}

const (
	// maxIdlePumps bounds the goroutines kept waiting to copy a call's
	// requests, and pumpIdle how long each waits before it exits.
	maxIdlePumps = 64
	pumpIdle     = 250 * time.Millisecond
)

// backendFailure is err, a backend's failure, as the caller sees it.
func (o *options) backendFailure(ctx context.Context, b Backend, err error) error {
	err = statusOf(err)
	if o.backendErr != nil {
		if rewritten := o.backendErr(ctx, b, err); rewritten != nil {
			return statusOf(rewritten)
		}
	}
	return err
}

func newOptions(opts []Option) *options {
	o := &options{labelField: DefaultLabelField}
	for _, opt := range opts {
		opt(o)
	}
	o.callOpts = append(o.callOpts, grpc.ForceCodecV2(Codec()))
	o.pumps = workers.New(func(p pump) { pumpRequests(p.call, p.cs) }, maxIdlePumps, pumpIdle)
	o.mirrorTasks = workers.New(mirrorTask.run, maxIdlePumps, pumpIdle)
	return o
}

// WithCallOptions adds opts to every call the proxy makes to a backend:
// grpc.UseCompressor, for instance, compresses the hop to the backends (over
// a tunnel, between two ends of package tunnel that have the compressor
// registered), and grpc.MaxCallRecvMsgSize bounds what a backend may
// answer. The proxy's own codec always applies; a codec given here does
// not.
func WithCallOptions(opts ...grpc.CallOption) Option {
	return func(o *options) { o.callOpts = append(o.callOpts, opts...) }
}

// WithBackendErrors sets f to see every status a backend call fails with
// (whether the backend sent it or the connection to the backend produced
// it) before the caller does; what f returns is what the caller gets, nil
// meaning err unchanged. A proxy in front of several hops uses it to say
// which hop failed: a status naming an internal address, say, can become
// "backend X is unreachable" with the detail logged instead. Keep the
// backend's own statuses as they are unless they are wrong for the caller:
// the proxy is otherwise transparent. ctx is the call's. A mirror's
// failure (see [Mirror]) is not rewritten: it never reaches the client on
// its own, but goes to the mirror's OnError as the mirror gave it.
func WithBackendErrors(f func(ctx context.Context, b Backend, err error) error) Option {
	return func(o *options) { o.backendErr = f }
}

// ServerOptions returns the options that make a *grpc.Server forward every
// call to a service it does not implement itself through director.
func ServerOptions(director Director, opts ...Option) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(Codec()),
		grpc.UnknownServiceHandler(Handler(director, opts...)),
	}
}

// Handler returns a stream handler that forwards each call as director
// decides: to one backend transparently, or fanned out to several (see the
// package documentation). The server running it must use Codec (see
// ServerOptions).
func Handler(director Director, opts ...Option) grpc.StreamHandler {
	o := newOptions(opts)
	return func(_ any, ss grpc.ServerStream) error {
		method, ok := grpc.MethodFromServerStream(ss)
		if !ok {
			return status.Error(codes.Internal, "proxy: no method name for the call")
		}
		call := &Call{method: method, stream: ss}
		route, err := director(ss.Context(), call)
		if err != nil {
			call.release()
			return statusOf(err)
		}
		if route.mirrored() {
			return mirror(call, route, o) // mirror.go; it owns call
		}
		// From here on, forward and fanOut own call: they hand it to the
		// goroutine that reads requests, which may outlive the handler.
		switch {
		case len(route.Backends) == 0:
			call.release()
			return status.Errorf(codes.Unavailable, "proxy: no backend for %s", method)
		case len(route.Backends) == 1 && !route.FanOut:
			return forward(call, route.Backends[0], route.Metadata, o)
		default:
			return fanOut(call, route, o)
		}
	}
}

// forward runs one call through backend.
func forward(call *Call, backend Backend, md metadata.MD, o *options) error {
	if backend.Conn == nil {
		call.release()
		return status.Errorf(codes.Unavailable, "proxy: no backend for %s", call.method)
	}
	ss := call.stream
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, md)
	cs, err := backend.Conn.NewStream(ctx, bidiDesc, call.method, o.callOpts...)
	if err != nil {
		call.release()
		return o.backendFailure(ss.Context(), backend, err)
	}

	// Requests flow on their own goroutine; the call ends with the
	// backend's response side, whatever the request side is doing. That
	// goroutine may be blocked reading the client, which only returning
	// from the handler can end, so it is not waited for: it returns as soon
	// as gRPC ends the call. It owns call from here on.
	o.pumps.Go(pump{call, cs})
	backendErr, callerErr := pumpResponses(ss, cs)
	if backendErr != nil {
		return o.backendFailure(ss.Context(), backend, backendErr)
	}
	return statusOf(callerErr)
}

// bidiDesc describes every forwarded call: the proxy does not know a
// method's kind, and a stream in both directions carries them all.
var bidiDesc = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// pumpRequests copies the client's messages to the backend, then
// half-closes. It returns once the client half-closes, the call ends, or the
// backend's side is over (its status comes on the response side).
func pumpRequests(call *Call, cs grpc.ClientStream) {
	defer call.release()
	for {
		f, err := call.recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				_ = cs.CloseSend()
			}
			return
		}
		err = cs.SendMsg(f)
		f.free()
		if err != nil {
			return
		}
	}
}

// pumpResponses sends the backend's headers the moment they arrive, then
// its messages, then its trailers and status. It returns the backend's
// failure, or else the caller's (a send to the caller failing).
func pumpResponses(ss grpc.ServerStream, cs grpc.ClientStream) (backendErr, callerErr error) {
	hdr, err := cs.Header()
	if err != nil {
		// Failed before any header: nothing to send but the status.
		ss.SetTrailer(cs.Trailer())
		return err, nil
	}
	if hdr != nil {
		if err := ss.SendHeader(hdr); err != nil {
			return nil, err
		}
	}
	f := new(Frame) // reused: gRPC keeps no hold on a message once sent
	for {
		err := cs.RecvMsg(f)
		if err != nil {
			ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil, nil
			}
			return err, nil
		}
		err = ss.SendMsg(f)
		f.free()
		if err != nil {
			return nil, err
		}
	}
}

// statusOf keeps gRPC statuses as they are and turns anything else into
// Internal... except context errors, which become their own codes.
func statusOf(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.FromContextError(err).Err()
	}
	return status.Error(codes.Internal, "proxy: "+err.Error())
}
