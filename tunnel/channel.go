package tunnel

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// PendingChannel is a forward tunnel that has not been opened yet; see
// NewChannel.
type PendingChannel interface {
	// Start opens the tunnel and returns once it is ready for calls. The
	// tunnel lives until ctx is done or it is closed. Call options apply to
	// the opening RPC (credentials, for instance). ctx's outgoing metadata
	// is sent with the opening RPC, and handlers on the other side can read
	// it with TunnelMetadataFromIncomingContext.
	Start(ctx context.Context, opts ...grpc.CallOption) (TunnelChannel, error)
}

// NewChannel prepares a forward tunnel over stub: once started, every call
// made through the returned channel reaches the one server that accepted the
// tunnel, with the services registered on its TunnelServiceHandler. Use it
// to pin a conversation of many calls to one backend behind a load balancer.
func NewChannel(stub tunnelpb.TunnelServiceClient, opts ...TunnelOption) PendingChannel {
	return &pendingChannel{stub: stub, opts: newOptions(opts)}
}

type pendingChannel struct {
	stub tunnelpb.TunnelServiceClient
	opts *options
}

func (p *pendingChannel) Start(ctx context.Context, opts ...grpc.CallOption) (TunnelChannel, error) {
	openedMD, _ := metadata.FromOutgoingContext(ctx)
	openedMD = openedMD.Copy()
	ctx, cancel := context.WithCancel(ctx)
	streamCtx := metadata.NewOutgoingContext(ctx, metadata.Join(openedMD, p.opts.openingHeaders()))
	stream, err := p.stub.OpenTunnel(streamCtx, withFrameCodec(opts)...)
	if err != nil {
		cancel()
		return nil, err
	}
	hdr, err := stream.Header()
	if err != nil {
		cancel()
		return nil, err
	}
	if hdr == nil {
		// No headers: the server refused the tunnel; its status says why.
		_, err := stream.Recv()
		cancel()
		return nil, err
	}
	pr, _ := peer.FromContext(stream.Context())
	t := newTunnelClient(ctx, cancel, stream, p.opts, p.opts.agreed(hdr), false, pr)
	t.openedMD = openedMD
	go func() {
		t.readLoop()
		t.out.Close(errTunnelClosed)
	}()
	select {
	case <-t.ready:
		return t, nil
	case <-t.done:
		return nil, t.unavailable()
	}
}
