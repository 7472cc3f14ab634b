package proxy

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Director picks the backend for a call. It gets the call's context (with
// the incoming metadata and peer) and full method name, and returns the
// channel to forward to and the outgoing metadata to send with the call
// (typically a filtered copy of the incoming metadata). An error, ideally a
// gRPC status, fails the call without contacting any backend.
type Director func(ctx context.Context, fullMethod string) (backend grpc.ClientConnInterface, md metadata.MD, err error)

// ServerOptions returns the options that make a *grpc.Server forward every
// call to a service it does not implement itself through director.
func ServerOptions(director Director) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(Codec()),
		grpc.UnknownServiceHandler(Handler(director)),
	}
}

// Handler returns a stream handler that forwards each call as director
// decides. The server running it must use Codec (see ServerOptions).
func Handler(director Director) grpc.StreamHandler {
	return func(_ any, ss grpc.ServerStream) error {
		method, ok := grpc.MethodFromServerStream(ss)
		if !ok {
			return status.Error(codes.Internal, "proxy: no method name for the call")
		}
		backend, md, err := director(ss.Context(), method)
		if err != nil {
			return statusOf(err)
		}
		return forward(ss, backend, method, md)
	}
}

// forward runs one call through backend.
func forward(ss grpc.ServerStream, backend grpc.ClientConnInterface, method string, md metadata.MD) error {
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, md)
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	cs, err := backend.NewStream(ctx, desc, method, grpc.ForceCodecV2(Codec()))
	if err != nil {
		return statusOf(err)
	}

	// Requests flow on their own goroutine; the call ends with the
	// backend's response side, whatever the request side is doing. That
	// goroutine may be blocked reading the client, which only returning
	// from the handler can end, so it is not waited for: it returns as soon
	// as gRPC ends the call.
	go pumpRequests(ss, cs)
	return pumpResponses(ss, cs)
}

// pumpRequests copies the client's messages to the backend, then
// half-closes. It returns once the client half-closes, the call ends, or the
// backend's side is over (its status comes on the response side).
func pumpRequests(ss grpc.ServerStream, cs grpc.ClientStream) {
	for {
		f := new(Frame)
		if err := ss.RecvMsg(f); err != nil {
			if errors.Is(err, io.EOF) {
				_ = cs.CloseSend()
			}
			return
		}
		err := cs.SendMsg(f)
		f.free()
		if err != nil {
			return
		}
	}
}

// pumpResponses sends the backend's headers the moment they arrive, then
// its messages, then its trailers and status.
func pumpResponses(ss grpc.ServerStream, cs grpc.ClientStream) error {
	hdr, err := cs.Header()
	if err != nil {
		// Failed before any header: nothing to send but the status.
		ss.SetTrailer(cs.Trailer())
		return statusOf(err)
	}
	if hdr != nil {
		if err := ss.SendHeader(hdr); err != nil {
			return statusOf(err)
		}
	}
	for {
		f := new(Frame)
		err := cs.RecvMsg(f)
		if err != nil {
			ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return statusOf(err)
		}
		err = ss.SendMsg(f)
		f.free()
		if err != nil {
			return statusOf(err)
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
