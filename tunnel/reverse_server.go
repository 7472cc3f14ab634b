package tunnel

import (
	"context"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// ReverseTunnelServer serves gRPC services over reverse tunnels: it dials a
// TunnelServiceHandler and lets that server call the services registered
// here. It is how a client behind NAT or a firewall exposes services to a
// server it can reach but that cannot reach it.
type ReverseTunnelServer struct {
	stub tunnelpb.TunnelServiceClient
	opts *options
	svc  *services

	mu       sync.Mutex
	calls    map[*serveCall]struct{}
	stopping chan struct{} // closed by Stop or GracefulStop
	stopped  bool
	graceful bool
	serving  sync.WaitGroup
}

// NewReverseTunnelServer returns a server that opens its tunnels through
// stub.
func NewReverseTunnelServer(stub tunnelpb.TunnelServiceClient, opts ...TunnelOption) *ReverseTunnelServer {
	return &ReverseTunnelServer{
		stub:     stub,
		opts:     newOptions(opts),
		svc:      newServices(),
		calls:    map[*serveCall]struct{}{},
		stopping: make(chan struct{}),
	}
}

var _ grpc.ServiceRegistrar = (*ReverseTunnelServer)(nil)

// RegisterService registers a service implementation to serve over the
// reverse tunnels; generated RegisterXxxServer functions accept the server.
// Register everything before calling Serve. To intercept calls, give
// WithUnaryInterceptor and the like to NewReverseTunnelServer, or register
// through a wrapper such as grpchan.WithInterceptor(server, unary, stream).
func (s *ReverseTunnelServer) RegisterService(desc *grpc.ServiceDesc, impl any) {
	s.svc.RegisterService(desc, impl)
}

// GetServiceInfo reports the registered services, in the form *grpc.Server
// uses (server reflection reads it).
func (s *ReverseTunnelServer) GetServiceInfo() map[string]grpc.ServiceInfo {
	return s.svc.GetServiceInfo()
}

// Serve opens one reverse tunnel and serves calls on it until the tunnel
// ends. Call it once per tunnel wanted; concurrent calls open several
// tunnels. started reports whether the tunnel opened at all: when false,
// err says why it could not (the server refused it, or it was unreachable),
// and retrying makes sense. Once started, Serve returns nil after a clean
// end (Stop, GracefulStop, or the server ending the tunnel), ctx's error if
// ctx ended it, and otherwise the failure.
//
// ctx's outgoing metadata and opts go with the opening RPC; use them for
// credentials. The server reads that metadata from the tunnel's Context.
func (s *ReverseTunnelServer) Serve(ctx context.Context, opts ...grpc.CallOption) (started bool, err error) {
	return s.serve(ctx, nil, opts)
}

// serve is Serve, calling opened (if not nil) once the tunnel is open and
// before it serves any call, with the opening RPC's response header and a
// function that gives the tunnel back. opened returning an error gives it
// back at once. A tunnel given back is drained; once it has ended cleanly,
// serve returns an error that wraps ErrGivenBack and the reason.
func (s *ReverseTunnelServer) serve(ctx context.Context, opened func(hdr metadata.MD, giveBack func(reason error)) error, opts []grpc.CallOption) (started bool, err error) {
	openedMD, _ := metadata.FromOutgoingContext(ctx)
	openedMD = openedMD.Copy()
	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	call := &serveCall{cancel: cancel}
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return false, ErrServerStopped
	}
	s.calls[call] = struct{}{}
	s.serving.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.calls, call)
		s.mu.Unlock()
		s.serving.Done()
	}()
	stream, err := s.stub.OpenReverseTunnel(metadata.NewOutgoingContext(streamCtx, metadata.Join(openedMD, s.opts.openingHeaders())), withFrameCodec(opts)...)
	if err != nil {
		return false, err
	}
	hdr, err := stream.Header()
	if err != nil {
		return false, err
	}
	if hdr == nil {
		// No headers: the server refused the tunnel; its status says why.
		_, err := stream.Recv()
		return false, err
	}
	p, _ := peer.FromContext(stream.Context())
	agreed := s.opts.agreed(hdr)
	frames := &reverseFrames{TunnelService_OpenReverseTunnelClient: stream, s: s, call: call}
	t := newTunnelServer(streamCtx, frames, s.opts, s.svc, agreed, true, p, openedMD)
	t.closeSend = stream.CloseSend
	t.abort = cancel

	s.mu.Lock()
	call.t = t
	// A negotiated tunnel sends its settings first; a drain notice queued
	// before them would reach the peer first, and break the protocol.
	call.drainable = !agreed.negotiated
	drain := s.stopped && s.graceful
	s.mu.Unlock()
	if drain {
		s.drain(call)
	}
	if opened != nil {
		if reason := opened(hdr, func(reason error) { s.giveBack(call, reason) }); reason != nil {
			s.giveBack(call, reason)
		}
	}

	err = t.serve(true)
	s.mu.Lock()
	stopped := s.stopped
	givenBack := call.givenBack
	s.mu.Unlock()
	switch {
	case stopped:
		return true, nil
	case ctx.Err() != nil:
		return true, ctx.Err()
	case err == nil && givenBack != nil:
		return true, errGivenBackFor(givenBack)
	}
	return true, err
}

// giveBack drains call's tunnel on its client's initiative, recording the
// first reason given.
func (s *ReverseTunnelServer) giveBack(call *serveCall, reason error) {
	if reason == nil {
		reason = errNoReasonGiven
	}
	s.mu.Lock()
	if call.givenBack == nil {
		call.givenBack = reason
	}
	s.mu.Unlock()
	s.drain(call)
}

// drain drains call's tunnel, once it may: a negotiated tunnel not yet
// serving has its drain noted, for its first read to carry out.
func (s *ReverseTunnelServer) drain(call *serveCall) {
	s.mu.Lock()
	t := call.t
	if t != nil && !call.drainable {
		call.drainPending = true
		t = nil
	}
	s.mu.Unlock()
	if t != nil {
		t.drain()
	}
}

// reverseFrames is the outer stream of a reverse tunnel, which tells the
// ReverseTunnelServer when the tunnel first reads: by then it has sent its
// settings, so that a drain notice may follow them.
type reverseFrames struct {
	tunnelpb.TunnelService_OpenReverseTunnelClient
	s       *ReverseTunnelServer
	call    *serveCall
	reading bool // only the tunnel's reader calls Recv
}

func (f *reverseFrames) RecvMsg(m any) error {
	if !f.reading {
		f.reading = true
		f.s.mu.Lock()
		f.call.drainable = true
		pending := f.call.drainPending
		t := f.call.t
		f.s.mu.Unlock()
		if pending {
			t.drain()
		}
	}
	return f.TunnelService_OpenReverseTunnelClient.RecvMsg(m)
}

// GracefulStop stops the server gently: every tunnel refuses new calls with
// Unavailable, finishes the calls in progress, then closes. It returns when
// every Serve call has returned; later calls to Serve fail at once.
func (s *ReverseTunnelServer) GracefulStop() {
	s.mu.Lock()
	s.markStopped()
	s.graceful = true
	calls := make([]*serveCall, 0, len(s.calls))
	for c := range s.calls {
		calls = append(calls, c)
	}
	s.mu.Unlock()
	for _, c := range calls {
		s.mu.Lock()
		open := c.t != nil
		s.mu.Unlock()
		if open {
			s.drain(c)
		} else {
			c.cancel() // not open yet: nothing to finish
		}
	}
	s.serving.Wait()
}

// Stop closes every tunnel at once: calls in progress are cancelled. It
// returns when every Serve call has returned; later calls to Serve fail at
// once.
func (s *ReverseTunnelServer) Stop() {
	s.mu.Lock()
	s.markStopped()
	s.graceful = false
	calls := s.snapshot()
	s.mu.Unlock()
	for _, c := range calls {
		c.cancel()
	}
	s.serving.Wait()
}

// markStopped records the stop; s.mu must be held.
func (s *ReverseTunnelServer) markStopped() {
	if !s.stopped {
		s.stopped = true
		close(s.stopping)
	}
}

// serveCall is one Serve in progress. Fields other than cancel are
// guarded by the server's mu.
type serveCall struct {
	cancel context.CancelFunc // ends the opening RPC and so the tunnel
	t      *tunnelServer      // set once the tunnel is open
	// drainable is set once t may be drained: it has sent its settings,
	// or has none to send. Until then a drain only sets drainPending.
	drainable    bool
	drainPending bool
	givenBack    error // why the client gave the tunnel back, if it did
}

// snapshot copies the calls in progress; s.mu must be held. Their t fields
// are copied too, so the caller may use them after unlocking.
func (s *ReverseTunnelServer) snapshot() []serveCall {
	out := make([]serveCall, 0, len(s.calls))
	for c := range s.calls {
		out = append(out, *c)
	}
	return out
}
