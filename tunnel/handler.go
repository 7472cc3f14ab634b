package tunnel

import (
	"context"
	"errors"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// TunnelServiceHandlerOptions configures a TunnelServiceHandler.
type TunnelServiceHandlerOptions struct {
	// NoReverseTunnels refuses OpenReverseTunnel with Unimplemented.
	NoReverseTunnels bool
	// OnReverseTunnelOpen, if set, is called once for each reverse tunnel,
	// when it is ready for calls.
	OnReverseTunnelOpen func(TunnelChannel)
	// OnReverseTunnelClose, if set, is called once for each reverse tunnel
	// that was reported open, after it has ended.
	OnReverseTunnelClose func(TunnelChannel)
	// AffinityKey, if set, names the group a reverse tunnel belongs to;
	// KeyAsChannel reaches the tunnels of one group. It is called once per
	// tunnel, before OnReverseTunnelOpen, and the tunnel's Context carries
	// the opening RPC's peer, metadata and interceptor values, so the key
	// can come from the client's authenticated identity. The key must be
	// comparable (usable as a map key): a tunnel whose key is not is closed
	// with Internal as soon as it opens. Without AffinityKey every tunnel's
	// key is nil.
	AffinityKey func(TunnelChannel) any
	// DisableFlowControl makes every tunnel speak protocol revision zero;
	// see WithDisableFlowControl.
	DisableFlowControl bool
	// TunnelOptions configure the handler's end of every tunnel it
	// accepts, as for NewChannel and NewReverseTunnelServer.
	TunnelOptions []TunnelOption
	// MaxReverseTunnels bounds the reverse tunnels the handler holds at
	// once (10,000 if zero); more are refused with ResourceExhausted before
	// they open.
	MaxReverseTunnels int
	// MaxReverseTunnelsPerKey bounds the reverse tunnels with one affinity
	// key (100 if zero), so that one client cannot crowd out the others;
	// more are closed with ResourceExhausted once their key is known. It
	// applies only with an AffinityKey function.
	MaxReverseTunnelsPerKey int
}

const (
	defaultMaxReverseTunnels       = 10000
	defaultMaxReverseTunnelsPerKey = 100
)

func (h *TunnelServiceHandler) maxPerKey() int {
	if h.cfg.AffinityKey == nil {
		// Without keys every tunnel shares the nil key; only the total
		// applies.
		return h.maxReverse()
	}
	if h.cfg.MaxReverseTunnelsPerKey > 0 {
		return h.cfg.MaxReverseTunnelsPerKey
	}
	return defaultMaxReverseTunnelsPerKey
}

func (h *TunnelServiceHandler) maxReverse() int {
	if h.cfg.MaxReverseTunnels > 0 {
		return h.cfg.MaxReverseTunnels
	}
	return defaultMaxReverseTunnels
}

// TunnelServiceHandler implements the tunnel service on a gRPC server. It
// serves forward tunnels with the services registered on it (it is a
// grpc.ServiceRegistrar), and it keeps the reverse tunnels that clients open,
// so that the server can call services those clients host: see AsChannel
// and KeyAsChannel. Register it with a *grpc.Server through Service.
type TunnelServiceHandler struct {
	svc            *services
	cfg            TunnelServiceHandlerOptions
	opts           *options
	pool           *tunnelPool
	forwardTunnels sync.Map // *tunnelServer -> struct{}, to drain them

	mu       sync.Mutex
	stopping bool
}

// NewTunnelServiceHandler returns a handler configured by options.
func NewTunnelServiceHandler(options TunnelServiceHandlerOptions) *TunnelServiceHandler {
	o := newOptions(options.TunnelOptions)
	if options.DisableFlowControl {
		o.disableFlowControl = true
	}
	return &TunnelServiceHandler{
		svc:  newServices(),
		cfg:  options,
		opts: o,
		pool: newTunnelPool(),
	}
}

var _ grpc.ServiceRegistrar = (*TunnelServiceHandler)(nil)

// RegisterService registers a service implementation to be served on forward
// tunnels; generated RegisterXxxServer functions accept the handler. To
// intercept tunneled calls, give WithUnaryInterceptor and the like in
// TunnelServiceHandlerOptions.TunnelOptions, or register through a wrapper
// such as grpchan.WithInterceptor(handler, unary, stream).
func (h *TunnelServiceHandler) RegisterService(desc *grpc.ServiceDesc, impl any) {
	h.svc.RegisterService(desc, impl)
}

// GetServiceInfo reports the services served on forward tunnels, in the
// form *grpc.Server uses (server reflection reads it).
func (h *TunnelServiceHandler) GetServiceInfo() map[string]grpc.ServiceInfo {
	return h.svc.GetServiceInfo()
}

// Service returns the tunnel service implementation to register with a
// *grpc.Server: tunnelpb.RegisterTunnelServiceServer(server, h.Service()).
func (h *TunnelServiceHandler) Service() tunnelpb.TunnelServiceServer {
	return tunnelService{h: h}
}

// AsChannel returns a channel that spreads calls over every open reverse
// tunnel, as ReverseClientConnInterface describes. It panics if reverse
// tunnels are disabled.
func (h *TunnelServiceHandler) AsChannel() ReverseClientConnInterface {
	if h.cfg.NoReverseTunnels {
		panic("grpctunnel: AsChannel on a handler with NoReverseTunnels")
	}
	return h.opts.intercepted(reverseChannel{pool: h.pool, all: true})
}

// KeyAsChannel returns a channel that spreads calls over the open reverse
// tunnels whose affinity key is key, as ReverseClientConnInterface
// describes. It panics if reverse tunnels are disabled.
func (h *TunnelServiceHandler) KeyAsChannel(key any) ReverseClientConnInterface {
	if h.cfg.NoReverseTunnels {
		panic("grpctunnel: KeyAsChannel on a handler with NoReverseTunnels")
	}
	return h.opts.intercepted(reverseChannel{pool: h.pool, key: key})
}

// AllReverseTunnels returns the reverse tunnels open now, oldest first.
func (h *TunnelServiceHandler) AllReverseTunnels() []TunnelChannel {
	return h.pool.snapshot()
}

// InitiateShutdown starts a graceful drain and returns at once: new tunnels
// and new calls on every tunnel are refused with Unavailable, calls in
// progress run to completion, and each tunnel ends as soon as it is idle.
// Pair it with grpc.Server.GracefulStop, which waits for those tunnels.
func (h *TunnelServiceHandler) InitiateShutdown() {
	h.mu.Lock()
	h.stopping = true
	h.mu.Unlock()
	h.forwardTunnels.Range(func(k, _ any) bool {
		k.(*tunnelServer).drain()
		return true
	})
	h.pool.mu.Lock()
	reverse := append([]*tunnelClient(nil), h.pool.all...)
	h.pool.mu.Unlock()
	for _, t := range reverse {
		t.drain()
	}
}

func (h *TunnelServiceHandler) isStopping() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stopping
}

func (h *TunnelServiceHandler) openTunnel(stream tunnelpb.TunnelService_OpenTunnelServer) error {
	if h.svc.empty() && h.opts.unknownHandler == nil {
		return errNoForwardServices
	}
	if h.isStopping() {
		return errShuttingDown
	}
	md, _ := metadata.FromIncomingContext(stream.Context())
	resp, agreed := h.opts.accept(md)
	p, _ := peer.FromContext(stream.Context())
	t := newTunnelServer(stream.Context(), stream, h.opts, h.svc, agreed, false, p, md)
	// Listed before the headers go out, so that once the client has its
	// tunnel, Tunnels here shows it.
	h.forwardTunnels.Store(t, struct{}{})
	defer h.forwardTunnels.Delete(t)
	// Headers go out at once: the client waits for them before anything
	// else, and they tell it whether revision one was agreed.
	if err := stream.SendHeader(resp); err != nil {
		t.shutdown(tunnelFailure(err)) // nothing started yet
		return err
	}
	// With tunnel-close this goroutine can read frames itself and still
	// end the tunnel whenever it must, by asking the client to; unless a
	// keepalive may give the client up (see readsInline).
	inline := h.opts.readsInline(agreed)
	t.askPeerToClose = inline
	if h.isStopping() {
		t.drain()
	}
	return t.serve(inline)
}

func (h *TunnelServiceHandler) openReverseTunnel(stream tunnelpb.TunnelService_OpenReverseTunnelServer) error {
	if h.cfg.NoReverseTunnels {
		return errNoReverseTunnels
	}
	if h.isStopping() {
		return errShuttingDown
	}
	if h.pool.size() >= h.maxReverse() {
		return errTooManyReverse
	}
	md, _ := metadata.FromIncomingContext(stream.Context())
	resp, agreed := h.opts.accept(md)
	if err := stream.SendHeader(resp); err != nil {
		return err
	}
	// The tunnel's context keeps the stream's values but is cancelled by the
	// tunnel's end alone, which the stream's end brings about anyway (the
	// read fails): not registering with the stream's context saves each
	// held tunnel a map entry there.
	ctx, cancel := context.WithCancel(context.WithoutCancel(stream.Context()))
	p, _ := peer.FromContext(ctx)
	t := newTunnelClient(ctx, cancel, stream, h.opts, agreed, true, p)
	t.onClose = func() { h.pool.remove(t) }
	// With tunnel-close this goroutine reads the frames itself and ends the
	// tunnel by asking the client to; without it a reader goroutine must,
	// so that this one can return whenever the tunnel has to end.
	inline := h.opts.readsInline(agreed)
	defer func() {
		if inline || !t.peerDead.Load() {
			// Sends end soon: the peer reads, or (inline) holds this
			// goroutine in Recv anyway; a request to close must leave
			// before the return.
			t.out.Close(errTunnelClosed)
			return
		}
		// The keepalive gave the peer up: a send that stays blocked on it
		// ends only with the outer stream, that is once this returns, so
		// it is not waited for (see tunnelServer.serve).
		t.out.abandon(errTunnelClosed)
		closed := make(chan struct{})
		go func() {
			t.out.Close(errTunnelClosed)
			close(closed)
		}()
		t.out.outlast(closed, blockedSendPatience(h.opts.keepaliveTimeout))
	}()
	// Set before any goroutine of the tunnel starts; later changes are
	// under t.mu (see shutdownHere).
	t.askPeerToClose = inline
	if inline {
		if err := t.handshake(); err != nil {
			t.shutdown(err)
			return err
		}
	} else {
		go t.readLoop()
		select {
		case <-t.ready:
		case <-t.done:
			return t.err
		}
	}
	var key any
	if h.cfg.AffinityKey != nil {
		key = h.cfg.AffinityKey(t)
		if !comparable(key) {
			t.shutdownHere()
			return errKeyNotComparable(key)
		}
		t.mu.Lock()
		t.affinityKey = key
		t.mu.Unlock()
	}
	switch err := h.pool.add(t, key, h.maxPerKey()); {
	case errors.Is(err, errTooManyForKey):
		t.shutdownHere()
		return err
	case err == nil:
		if h.isStopping() {
			t.drain()
		}
		if h.cfg.OnReverseTunnelOpen != nil {
			h.cfg.OnReverseTunnelOpen(t)
		}
		if h.cfg.OnReverseTunnelClose != nil {
			defer h.cfg.OnReverseTunnelClose(t)
		}
	}
	if inline {
		t.shutdown(t.readFrames())
	} else {
		<-t.done
	}
	return t.err
}

type tunnelService struct {
	tunnelpb.UnimplementedTunnelServiceServer
	h *TunnelServiceHandler
}

func (s tunnelService) OpenTunnel(stream tunnelpb.TunnelService_OpenTunnelServer) error {
	return s.h.openTunnel(stream)
}

func (s tunnelService) OpenReverseTunnel(stream tunnelpb.TunnelService_OpenReverseTunnelServer) error {
	return s.h.openReverseTunnel(stream)
}
