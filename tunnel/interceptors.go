package tunnel

import (
	"context"
	"reflect"

	"google.golang.org/grpc"
)

// interceptors are the interceptor options of one tunnel end: the server
// ones apply where the end handles calls, the client ones where it issues
// them. The chains are resolved as each option applies, so that a call
// reads one field and, with no interceptor, pays nothing.
type interceptors struct {
	// As given: the single interceptor (none or one) and the chained ones.
	unary, chainUnary             []grpc.UnaryServerInterceptor
	stream, chainStream           []grpc.StreamServerInterceptor
	clientUnary, chainClientUnary []grpc.UnaryClientInterceptor
	clientStream, chainClientStrm []grpc.StreamClientInterceptor

	// Resolved: nil when there is none.
	unaryServer  grpc.UnaryServerInterceptor
	streamServer grpc.StreamServerInterceptor
	unaryClient  grpc.UnaryClientInterceptor
	streamClient grpc.StreamClientInterceptor
}

// joined is single followed by chain, in a new array: grpc-go likewise puts
// the interceptor of grpc.UnaryInterceptor before those of
// grpc.ChainUnaryInterceptor.
func joined[T any](single, chain []T) []T {
	return append(single[:len(single):len(single)], chain...)
}

func (ic *interceptors) resolve() {
	ic.unaryServer = chainUnaryServer(joined(ic.unary, ic.chainUnary))
	ic.streamServer = chainStreamServer(joined(ic.stream, ic.chainStream))
	ic.unaryClient = chainUnaryClient(joined(ic.clientUnary, ic.chainClientUnary))
	ic.streamClient = chainStreamClient(joined(ic.clientStream, ic.chainClientStrm))
}

// interceptorOption changes o's interceptors and resolves them again.
func interceptorOption(change func(*interceptors)) TunnelOption {
	return optionFunc(func(o *options) {
		change(&o.ic)
		o.ic.resolve()
	})
}

// WithUnaryInterceptor sets the unary server interceptor of the end that
// handles calls, as grpc.UnaryInterceptor does for a *grpc.Server: it wraps
// every unary call to a service registered on a ReverseTunnelServer, or on a
// TunnelServiceHandler (given in TunnelServiceHandlerOptions.TunnelOptions),
// and receives the method's full name and the registered implementation in
// its grpc.UnaryServerInfo. It runs outside any WithChainUnaryInterceptor
// ones. A later WithUnaryInterceptor replaces an earlier one (grpc-go
// panics instead). It needs no grpchan wrapper around the registrar; such
// wrappers still work, and run inside these interceptors.
func WithUnaryInterceptor(i grpc.UnaryServerInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.unary = appendNonNil(nil, i) })
}

// WithChainUnaryInterceptor adds unary server interceptors, as
// grpc.ChainUnaryInterceptor does for a *grpc.Server: the first is the
// outermost, and repeated options append to the chain, after the one set by
// WithUnaryInterceptor. See WithUnaryInterceptor for where they apply.
func WithChainUnaryInterceptor(is ...grpc.UnaryServerInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.chainUnary = appendNonNil(ic.chainUnary, is...) })
}

// WithStreamInterceptor sets the stream server interceptor of the end that
// handles calls, as grpc.StreamInterceptor does for a *grpc.Server: it wraps
// every streaming call to a registered service, with the method's full name,
// the registered implementation and which sides stream in its
// grpc.StreamServerInfo, and, as in grpc-go, every call passed to the
// handler of WithUnknownServiceHandler (with a nil implementation, and both
// sides streaming). It runs outside any WithChainStreamInterceptor ones; a
// later WithStreamInterceptor replaces an earlier one. It applies where
// WithUnaryInterceptor does.
func WithStreamInterceptor(i grpc.StreamServerInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.stream = appendNonNil(nil, i) })
}

// WithChainStreamInterceptor adds stream server interceptors, as
// grpc.ChainStreamInterceptor does for a *grpc.Server: the first is the
// outermost, and repeated options append to the chain, after the one set by
// WithStreamInterceptor. See WithStreamInterceptor for where they apply.
func WithChainStreamInterceptor(is ...grpc.StreamServerInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.chainStream = appendNonNil(ic.chainStream, is...) })
}

// WithClientUnaryInterceptor sets the unary client interceptor of the end
// that issues calls, as grpc.WithUnaryInterceptor does for a
// *grpc.ClientConn: it wraps every unary call made on the channel of
// NewChannel, or, given in TunnelServiceHandlerOptions.TunnelOptions, on the
// handler's reverse channels (AsChannel, KeyAsChannel, and each tunnel of
// AllReverseTunnels). It runs outside any WithChainClientUnaryInterceptor
// ones; a later WithClientUnaryInterceptor replaces an earlier one.
//
// The interceptor's cc argument is nil, since a tunnel is not a
// *grpc.ClientConn (grpchan.InterceptClientConn passes nil too). On a
// channel that is one tunnel, TunnelChannelFromContext(ctx) returns it; on
// a channel over a set of reverse tunnels the tunnel is picked by the
// invoker, so that each attempt of a retrying interceptor picks afresh, and
// the WithTunnelChannel call option reports which one carried the call.
// grpchan.InterceptClientConn around a channel still works, outside these.
func WithClientUnaryInterceptor(i grpc.UnaryClientInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.clientUnary = appendNonNil(nil, i) })
}

// WithChainClientUnaryInterceptor adds unary client interceptors, as
// grpc.WithChainUnaryInterceptor does for a *grpc.ClientConn: the first is
// the outermost, and repeated options append to the chain, after the one set
// by WithClientUnaryInterceptor. See WithClientUnaryInterceptor for where
// they apply and what cc is.
func WithChainClientUnaryInterceptor(is ...grpc.UnaryClientInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.chainClientUnary = appendNonNil(ic.chainClientUnary, is...) })
}

// WithClientStreamInterceptor sets the stream client interceptor of the end
// that issues calls, as grpc.WithStreamInterceptor does for a
// *grpc.ClientConn: it wraps every streaming call made on the channel. It
// runs outside any WithChainClientStreamInterceptor ones; a later
// WithClientStreamInterceptor replaces an earlier one. See
// WithClientUnaryInterceptor for where it applies and what cc is; the
// stream the streamer returns carries the tunnel in its Context
// (TunnelChannelFromContext).
func WithClientStreamInterceptor(i grpc.StreamClientInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.clientStream = appendNonNil(nil, i) })
}

// WithChainClientStreamInterceptor adds stream client interceptors, as
// grpc.WithChainStreamInterceptor does for a *grpc.ClientConn: the first is
// the outermost, and repeated options append to the chain, after the one set
// by WithClientStreamInterceptor. See WithClientUnaryInterceptor for where
// they apply and what cc is.
func WithChainClientStreamInterceptor(is ...grpc.StreamClientInterceptor) TunnelOption {
	return interceptorOption(func(ic *interceptors) { ic.chainClientStrm = appendNonNil(ic.chainClientStrm, is...) })
}

// appendNonNil appends the interceptors of is that are not nil (T is a
// function type).
func appendNonNil[T any](chain []T, is ...T) []T {
	for _, i := range is {
		if !reflect.ValueOf(i).IsNil() {
			chain = append(chain, i)
		}
	}
	return chain
}

// chainUnaryServer combines interceptors into one, the first outermost, as
// grpc-go does; nil for none.
func chainUnaryServer(is []grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	switch len(is) {
	case 0:
		return nil
	case 1:
		return is[0]
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		return is[0](ctx, req, info, unaryServerLink(is, 1, info, handler))
	}
}

func unaryServerLink(is []grpc.UnaryServerInterceptor, i int, info *grpc.UnaryServerInfo, final grpc.UnaryHandler) grpc.UnaryHandler {
	if i == len(is) {
		return final
	}
	return func(ctx context.Context, req any) (any, error) {
		return is[i](ctx, req, info, unaryServerLink(is, i+1, info, final))
	}
}

func chainStreamServer(is []grpc.StreamServerInterceptor) grpc.StreamServerInterceptor {
	switch len(is) {
	case 0:
		return nil
	case 1:
		return is[0]
	}
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return is[0](srv, ss, info, streamServerLink(is, 1, info, handler))
	}
}

func streamServerLink(is []grpc.StreamServerInterceptor, i int, info *grpc.StreamServerInfo, final grpc.StreamHandler) grpc.StreamHandler {
	if i == len(is) {
		return final
	}
	return func(srv any, ss grpc.ServerStream) error {
		return is[i](srv, ss, info, streamServerLink(is, i+1, info, final))
	}
}

func chainUnaryClient(is []grpc.UnaryClientInterceptor) grpc.UnaryClientInterceptor {
	switch len(is) {
	case 0:
		return nil
	case 1:
		return is[0]
	}
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return is[0](ctx, method, req, reply, cc, unaryClientLink(is, 1, invoker), opts...)
	}
}

func unaryClientLink(is []grpc.UnaryClientInterceptor, i int, final grpc.UnaryInvoker) grpc.UnaryInvoker {
	if i == len(is) {
		return final
	}
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, opts ...grpc.CallOption) error {
		return is[i](ctx, method, req, reply, cc, unaryClientLink(is, i+1, final), opts...)
	}
}

func chainStreamClient(is []grpc.StreamClientInterceptor) grpc.StreamClientInterceptor {
	switch len(is) {
	case 0:
		return nil
	case 1:
		return is[0]
	}
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		return is[0](ctx, desc, cc, method, streamClientLink(is, 1, streamer), opts...)
	}
}

func streamClientLink(is []grpc.StreamClientInterceptor, i int, final grpc.Streamer) grpc.Streamer {
	if i == len(is) {
		return final
	}
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		return is[i](ctx, desc, cc, method, streamClientLink(is, i+1, final), opts...)
	}
}

// Server side: wrapping a stream handler found by services.lookup.

// interceptStream runs a stream handler of impl through the stream server
// interceptors, if any.
func (ic *interceptors) interceptStream(impl any, h grpc.StreamHandler, st *serverStream, clientStreams, serverStreams bool) error {
	if ic.streamServer == nil {
		return h(impl, st)
	}
	info := &grpc.StreamServerInfo{FullMethod: st.method, IsClientStream: clientStreams, IsServerStream: serverStreams}
	return ic.streamServer(impl, st, info, h)
}

// Client side: a reverse channel behind the client interceptors. A single
// tunnel's Invoke and NewStream, which run them too, are in client_stream.go.

// intercepted returns c, or, if o has client interceptors, c behind them.
// The interceptors then run once per call, before a tunnel is picked; c
// itself calls the picked tunnel without them.
func (o *options) intercepted(c reverseChannel) ReverseClientConnInterface {
	if o.ic.unaryClient == nil && o.ic.streamClient == nil {
		return c
	}
	return interceptedReverse{reverseChannel: c, ic: &o.ic}
}

type interceptedReverse struct {
	reverseChannel
	ic *interceptors
}

func (c interceptedReverse) Invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	if c.ic.unaryClient == nil {
		return c.reverseChannel.Invoke(ctx, method, req, reply, opts...)
	}
	return c.ic.unaryClient(ctx, method, req, reply, nil, c.invoker, opts...)
}

func (c interceptedReverse) invoker(ctx context.Context, method string, req, reply any, _ *grpc.ClientConn, opts ...grpc.CallOption) error {
	return c.reverseChannel.Invoke(ctx, method, req, reply, opts...)
}

func (c interceptedReverse) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if c.ic.streamClient == nil {
		return c.reverseChannel.NewStream(ctx, desc, method, opts...)
	}
	return c.ic.streamClient(ctx, desc, nil, method, c.streamer, opts...)
}

func (c interceptedReverse) streamer(ctx context.Context, desc *grpc.StreamDesc, _ *grpc.ClientConn, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return c.reverseChannel.NewStream(ctx, desc, method, opts...)
}
