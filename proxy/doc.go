// Package proxy forwards gRPC calls without knowing their schema: messages
// pass through as bytes, never decoded, so one proxy serves any service.
//
// A [Director] decides, per call, where the call goes: any
// grpc.ClientConnInterface (a *grpc.ClientConn, a tunnel.TunnelChannel, or a
// reverse channel from tunnel.TunnelServiceHandler.KeyAsChannel) and the
// metadata to send. [Handler] returns the grpc.StreamHandler that does the
// forwarding; install it as the unknown-service handler of a *grpc.Server
// with [ServerOptions], or of a tunnel server.
//
// # One to one
//
// When the director returns one backend, forwarding is transparent: every
// message, the response headers (as soon as the backend sends them, before
// any message and on errors too), the trailers, the status with its
// details, half-close and cancellation pass unchanged. The call is routed
// before the first client message arrives, so a client that waits for
// headers first does not deadlock, and the proxied call ends when the
// backend's does, whether or not the client has half-closed.
//
// # One to many
//
// When the director returns several backends, or one in a [Route] with
// FanOut set, the call fans out: it runs on every backend at once, and the
// client receives every backend's responses, each labelled with the backend
// it came from (unless a [Responder] makes them otherwise; see below).
// FanOut keeps one shape of response whatever the number of backends, as
// siderolabs/grpc-proxy's One2Many mode does with one node.
//
//   - Requests: every request message goes to every backend, in the order
//     the client sent them, and the client's half-close half-closes every
//     backend. Messages are shared between backends, not copied. Requests
//     go at the pace of the slowest backend still running: the proxy reads
//     the client only while every running backend has room for a few more
//     messages, so nothing is buffered without bound. A backend whose call
//     has ended gets no more requests and holds up no one.
//   - Headers and trailers: once every backend's call is started (or has
//     failed to start), the proxy sends the client its own, empty, response
//     headers, so a client that waits for headers before it sends does not
//     deadlock. The backends' own headers and trailers are not forwarded:
//     the client has one set of each, and the backends have one apiece.
//   - Responses: each backend's messages reach the client as they arrive,
//     interleaved with the other backends' and in order for each backend.
//     Each one is the backend's message followed by one more field: the
//     label field (number [DefaultLabelField] unless [WithLabelField] says
//     otherwise, wire type bytes) holding a serialized
//     grpctunnel.proxy.v1.Label (package proxypb) whose backend is the
//     [Backend]'s Name. Names are the director's business: they may be
//     empty, and two backends may share one.
//   - Errors: a backend whose call ends with an error, including one that
//     could not be started, a Backend with a nil Conn and a backend that
//     timed out, adds one last message to the results: nothing but the label
//     field, with the Label's status set to the backend's status (code,
//     message and details). A backend that ends successfully adds nothing.
//   - End: the fanned-out call ends with OK once every backend's call has
//     ended, whatever their statuses; the client learns of failures from
//     the labels, and counts them in the trailers: [FanOutBackendsTrailer]
//     holds the number of backends, [FanOutFailedTrailer] the number that
//     failed. If the client cancels or its deadline passes, every
//     backend's call is cancelled and the call ends with the client's
//     status.
//
// Appending a field leaves a message valid: a protobuf parser keeps a field
// it does not know as an unknown field, and merges a repeated occurrence of
// one it knows. So the labels need no schema at all: any method of any
// service fans out unchanged, and the label lives in a field number no
// schema is likely to use.
//
// With the labels, a client calls a fanned-out method as a
// server-streaming one (grpc.StreamDesc with ServerStreams set), even if
// the backends' method is unary, since it gets one message per backend and
// one per failure. A Go client reads each result with [SplitLabel], on the
// raw message or on the unknown fields of the message decoded with the
// response's own type.
//
// A client in any language can instead declare a "fan-out view" of the
// method in its own .proto file: the same package, service and method
// names, returning a stream of a message that copies the response's fields
// and adds the label. For a backend's
//
//	package shop.v1;
//	service Stock { rpc Count(CountRequest) returns (CountReply); }
//	message CountReply { int64 items = 1; }
//
// the view is
//
//	package shop.v1;
//	import "grpctunnel/proxy/v1/label.proto";
//	service Stock { rpc Count(CountRequest) returns (stream CountReplyView); }
//	message CountRequest { ... } // as the backend's
//	message CountReplyView {
//	  int64 items = 1;
//	  grpctunnel.proxy.v1.Label label = 536870911;
//	}
//
// (a streaming request stays streaming), and its generated stubs call the fanned-out method and decode each
// result, label included, as an ordinary message. Since the view declares
// the backend's service name again, a program should not link both.
//
// # Responders, and Talos's convention
//
// Other one-to-many gRPC proxies label responses under a schema convention
// instead. Talos's grpc-proxy (siderolabs/grpc-proxy) requires every
// response message to be a repeated field 1 of replies whose own field 1 is
// a metadata message; a per-backend hook splices the backend's metadata, or
// its error, into each reply's bytes, and a unary call's replies are merged
// into one response, so that its clients call every method as declared.
//
// A [Responder] does the same here: set for the handler with
// [WithResponder], or for one call in [Route.Responder], it decides what
// each backend's messages and failure become in place of the labels, and
// how a unary call's results merge into one response. The proxy cannot
// tell a unary method from the wire, so the director says so in
// [Route.Unary] (siderolabs/grpc-proxy asks a WithStreamedDetector
// instead). [TalosResponder] follows Talos's convention, so a service
// written for Talos's apid, and its clients, work behind this proxy
// unchanged; a director migrated from siderolabs/grpc-proxy returns its
// One2Many backends in a Route with FanOut and Unary set (see the
// example). The default labels cost one buffer per message and no copy;
// a Responder works on a copy of each message.
//
// # Mirroring
//
// A route with [Route.Mirrors] is mirrored: its one backend, the primary,
// answers the client, and every mirror gets a copy of the requests, as the
// secondaries of GitLab Gitaly's praefect do. A director migrated from
// praefect returns its primary Destination as the route's backend, each
// secondary as a [Mirror] (Msg becoming FirstMessage, ErrHandler OnError)
// and its request finalizer as [Route.Finalize] (see the example). A
// route cannot both fan out and mirror: a mirrored route (one with Mirrors
// or Finalize) with several backends, or with FanOut set, fails the call
// with Internal before any backend is called, since only one of the two
// could be honoured and the director's mistake would otherwise go unseen.
//
//   - Answer: the client gets the primary's headers, messages, trailers
//     and status, forwarded as in a one-to-one call; nothing of a mirror's
//     answer reaches it. A mirror never holds up the primary's headers or
//     messages.
//   - Requests: every request message goes to the primary and to every
//     mirror, in order, shared between them, not copied; a mirror's first
//     one may be replaced ([Mirror.FirstMessage]). The client is read at
//     the primary's pace, whatever the mirrors' pace: what a mirror has not
//     taken yet is held for it, up to [WithMirrorBuffer] bytes
//     ([DefaultMirrorBuffer], 4 MiB). A mirror whose backlog would pass that
//     has fallen behind: the proxy gives up on it, cancels its call and
//     tells its OnError with a [*MirrorLagError] saying by how many
//     messages and bytes. A mirror gets no request the primary did not.
//   - End: once the primary's call has ended, the call's status waits for
//     the mirrors still running, for at most [WithMirrorWait]
//     ([DefaultMirrorWait], one second), since their failures may fail the
//     call; a mirror still running then is given up on (cancelled,
//     [*MirrorLagError] with Late set). A stalled mirror thus delays the
//     status by the wait at most and the primary's messages not at all;
//     WithMirrorWait(0) ends the call with the primary's, while a
//     deployment whose mirrors' results matter, as praefect's replicated
//     writes do, waits longer.
//   - Errors: after that, each failed mirror's OnError, in route order, is
//     told its failure (its status as the mirror or the connection to it
//     gave it, which [WithBackendErrors] does not rewrite, or the lag
//     error) and returns nil to swallow it or an error to fail the call. A
//     nil OnError swallows, so that a mirror is best effort unless the
//     director says otherwise. Then Finalize runs. The status is the first
//     of: the client's own (cancelled, deadline), the primary's failure,
//     the first error an OnError returned, Finalize's error. So, as in
//     praefect, a mirror or the finalizer fails a call only at its end,
//     after the client already has the primary's headers and messages; for
//     a unary call the client sees the error instead of the response.
//     Every OnError and Finalize still run when the call fails anyway, for
//     their logs and cleanup.
//   - Cancellation: if the client cancels, or its deadline passes, the
//     primary's and every mirror's calls are cancelled at once, without
//     the wait, and the call ends with the client's status. Each mirror
//     still running then is told of it through its OnError, with the
//     status its call ended with (Canceled, or DeadlineExceeded), since
//     such a mirror missed requests as surely as one that failed: a
//     replicating deployment schedules its repair as for any failure.
//     What OnError returns changes nothing then; a mirror that had
//     already finished successfully is not told.
package proxy
