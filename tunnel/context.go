package tunnel

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

type (
	tunnelIncomingMDKey struct{}
	tunnelOutgoingMDKey struct{}
	tunnelChannelKey    struct{}
)

// TunnelMetadataFromIncomingContext returns, to a handler of a tunneled call
// (or a server interceptor around it), the metadata of the RPC that opened
// the tunnel. That is where a tunnel's authentication usually lives, as the
// tunneled calls themselves reach the handler without transport credentials.
func TunnelMetadataFromIncomingContext(ctx context.Context) (metadata.MD, bool) {
	md, ok := ctx.Value(tunnelIncomingMDKey{}).(metadata.MD)
	return md.Copy(), ok
}

// TunnelMetadataFromOutgoingContext returns, on the client side of a forward
// tunnel, the metadata the tunnel was opened with. Client interceptors can
// find it in the context of a tunneled stream (grpc.ClientStream.Context).
func TunnelMetadataFromOutgoingContext(ctx context.Context) (metadata.MD, bool) {
	md, ok := ctx.Value(tunnelOutgoingMDKey{}).(metadata.MD)
	return md.Copy(), ok
}

// TunnelChannelFromContext returns the tunnel that carries a call, given the
// context of a tunneled client stream (grpc.ClientStream.Context), or nil for
// any other context. With a channel that spreads calls over many tunnels
// (TunnelServiceHandler.AsChannel), it tells which tunnel was picked.
func TunnelChannelFromContext(ctx context.Context) TunnelChannel {
	ch, _ := ctx.Value(tunnelChannelKey{}).(TunnelChannel)
	return ch
}

// WithTunnelChannel returns a call option that stores, once the call is
// over, the tunnel that carried it into *ch. It is the unary counterpart of
// TunnelChannelFromContext: a unary caller never sees the stream's context.
// ch must not be nil. On a channel that is not a tunnel, *ch is left alone.
func WithTunnelChannel(ch *TunnelChannel) grpc.CallOption {
	return &tunnelChannelCallOption{ch: ch}
}

type tunnelChannelCallOption struct {
	grpc.EmptyCallOption
	ch *TunnelChannel
}
