package tunnel

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/internal/workers"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// serverFrames is the outer stream as the tunnel server sees it, whichever
// end dialled.
type serverFrames interface {
	// SendMsg sends a *tunnelpb.ServerToClient or a *serverDataFrame.
	SendMsg(any) error
	// RecvMsg receives into a *receivedClientFrame.
	RecvMsg(any) error
}

// tunnelServer is the end of a tunnel that handles calls: the network server
// of a forward tunnel, the network client of a reverse one. Each call runs
// its handler in a goroutine of its own, as in grpc.Server.
type tunnelServer struct {
	tunnelEnd[*tunnelpb.ServerToClient, *serverStream]
	frames serverFrames
	svc    *services
	// closeSend, set on a network client, ends the outer stream cleanly
	// once a drained tunnel is idle; a network server just returns.
	closeSend func() error

	handlers sync.WaitGroup

	// workers run the calls' handlers on goroutines kept for the next
	// call, whose stacks earlier calls already grew.
	workers *workers.Pool[*serverStream]
}

func newTunnelServer(ctx context.Context, frames serverFrames, o *options, svc *services, a agreement, reverse bool, p *peer.Peer, openedMD metadata.MD) *tunnelServer {
	ctx, cancel := context.WithCancel(ctx)
	// Handlers must not inherit the opening RPC's outgoing metadata (a
	// network client's credentials, say) into calls they make themselves.
	ctx = metadata.NewOutgoingContext(ctx, nil)
	if p != nil {
		ctx = peer.NewContext(ctx, p)
	}
	ctx = context.WithValue(ctx, tunnelIncomingMDKey{}, openedMD)
	t := &tunnelServer{
		tunnelEnd: tunnelEnd[*tunnelpb.ServerToClient, *serverStream]{
			cancel:  cancel,
			opts:    o,
			agreed:  a,
			reverse: reverse,
			peer:    p,
			streams: map[int64]*serverStream{},
			done:    make(chan struct{}),
		},
		frames:  frames,
		svc:     svc,
		workers: workers.New((*serverStream).run, maxIdleWorkers, workerIdle),
	}
	t.begin(t, ctx, o.serverStats, frames.SendMsg, serverFramer(settingsStreamID))
	return t
}

// serve runs the tunnel until it ends and everything it started has
// stopped. With inline, frames are read on the calling goroutine; otherwise
// a reader goroutine does it, so that the caller can end the tunnel (a drain
// or shutdown) while a read is blocked.
func (t *tunnelServer) serve(inline bool) error {
	if t.agreed.negotiated {
		if err := t.out.Send(nil, t.opts.settingsFrame()); err != nil {
			t.shutdown(tunnelFailure(err))
		}
	}
	t.watchPeer()
	if inline {
		t.shutdown(t.read())
	} else {
		go func() { t.shutdown(t.read()) }()
		<-t.done
	}
	if t.abort == nil && !t.askPeerToClose && t.peerDead.Load() {
		// A network server ends the outer stream only by returning from
		// its handler, and a send blocked on a peer that stopped reading
		// ends only with the outer stream. Once the keepalive has given
		// the peer up, a send that stays blocked is such a send: this
		// returns without waiting for it, and the rest finishes in the
		// background once the return has released it. (A handler that
		// reads itself, asking its peer to close, never gets here: it
		// reads only when this end never gives its peer up; see
		// readsInline.)
		t.out.abandon(errTunnelClosed)
		finished := make(chan struct{})
		go func() {
			t.finish()
			close(finished)
		}()
		t.out.outlast(finished, blockedSendPatience(t.opts.keepaliveTimeout))
		return t.err
	}
	t.finish()
	return t.err
}

// finish waits for what the tunnel started once it has ended. Handlers stop
// once their contexts are cancelled, and no hold of the sender begins on an
// ended tunnel; after that nothing sends but the flusher, and the outer
// stream may be released.
func (t *tunnelServer) finish() {
	t.handlers.Wait()
	t.workers.Close()
	t.out.Close(errTunnelClosed)
}

// maxIdleWorkers bounds the worker goroutines a tunnel keeps waiting for
// calls, and workerIdle is how long one waits before it exits: a burst's
// workers are gone soon after it.
const (
	maxIdleWorkers = 16
	workerIdle     = time.Second
)

func (t *tunnelServer) read() error {
	return receiveFrames(t.frames.RecvMsg, new(receivedClientFrame), t.ka, t.dispatch, t.done, func() error { return t.err }, &t.counters.received)
}

func (t *tunnelServer) dispatch(f *receivedClientFrame) error {
	id := f.GetStreamId()
	switch fr := f.GetFrame().(type) {
	case nil:
		return protocolErrorf("frame of unknown type for stream %d", id)
	case *tunnelpb.ClientToServer_NewStream:
		return t.newStream(id, fr.NewStream)
	case *tunnelpb.ClientToServer_Cancel:
		if id == settingsStreamID && t.agreed.tunnelClose && t.reverse {
			return errPeerClosed
		}
	case *tunnelpb.ClientToServer_WindowUpdate:
		if t.keepaliveFrame(id, fr.WindowUpdate) {
			return nil
		}
	}
	st, ok, err := t.lookup(id)
	if !ok {
		return err
	}
	switch fr := f.GetFrame().(type) {
	case *tunnelpb.ClientToServer_RequestMessage:
		st.onMessage(fr.RequestMessage.GetSize(), f.payload())
	case *tunnelpb.ClientToServer_MoreRequestData:
		st.onMoreData(f.payload())
	case *tunnelpb.ClientToServer_HalfClose:
		st.onHalfClose()
	case *tunnelpb.ClientToServer_Cancel:
		st.onCancel()
	case *tunnelpb.ClientToServer_WindowUpdate:
		st.onWindowUpdate(fr.WindowUpdate)
	}
	return nil
}

// newStream starts a call, or refuses it with a close_stream.
func (t *tunnelServer) newStream(id int64, ns *tunnelpb.NewStream) error {
	if id <= t.lastID {
		return protocolErrorf("new stream %d does not follow stream %d", id, t.lastID)
	}
	t.lastID = id
	st, err := t.prepare(id, ns)
	if err != nil {
		t.out.Queue(serverFramer(id).closeStream(status.Convert(err), nil))
		return nil
	}
	t.mu.Lock()
	var refuse error
	switch {
	case t.state == endClosed || t.state == endDraining && !t.agreed.drain:
		// With the drain extension the calls that crossed the notice are
		// served: the client sent them before it knew.
		refuse = errShuttingDown
	case len(t.streams) >= t.opts.maxStreams:
		refuse = errTooManyStreams
	}
	if refuse != nil {
		t.mu.Unlock()
		st.cancel()
		t.out.Queue(serverFramer(id).closeStream(status.Convert(refuse), nil))
		return nil
	}
	t.addLocked(id, st)
	t.handlers.Add(1)
	t.mu.Unlock()
	if st.in.win != nil {
		// The settings fixed the initial window; a stream that starts from
		// a learned larger one says so at once.
		if extra := st.in.win.Grant(); extra > 0 {
			t.out.Queue(serverFramer(id).windowUpdate(extra))
		}
	}
	if h := t.opts.serverStats; h != nil {
		md, _ := metadata.FromIncomingContext(st.ctx)
		st.ctx = st.stats.beginServer(h, st.ctx, st.method, st.kind, t.peer, md, ns.GetRequestHeaders(), compressorName(st.comp))
	}
	t.workers.Go(st)
	return nil
}

// prepare builds a stream for a new_stream frame, or says why it is refused.
func (t *tunnelServer) prepare(id int64, ns *tunnelpb.NewStream) (*serverStream, error) {
	flowControl := false
	switch rev := ns.GetProtocolRevision(); {
	case rev == tunnelpb.ProtocolRevision_REVISION_ZERO:
	case rev == tunnelpb.ProtocolRevision_REVISION_ONE && t.agreed.negotiated:
		flowControl = true
	default:
		return nil, errUnsupportedRevision(rev)
	}
	handler, kind, err := t.svc.lookup(ns.GetMethodName(), t.opts)
	if err != nil {
		return nil, err
	}
	md, err := t.opts.decodeMetadata(ns.GetRequestHeaders(), t.agreed.binaryMetadata)
	if err != nil {
		return nil, err
	}
	// As in gRPC, requests this end cannot decompress are Unimplemented.
	comp, err := recvCompressor(ns.GetRequestHeaders(), t.agreed.compression, codes.Unimplemented)
	if err != nil {
		return nil, err
	}
	ctx := t.ctx
	var cancel context.CancelFunc
	if v := ns.GetRequestHeaders().GetMd()[timeoutHeader].GetVal(); len(v) > 0 {
		d, err := decodeTimeout(v[0])
		if err != nil {
			return nil, errHeaderIn(err)
		}
		ctx, cancel = context.WithTimeout(ctx, d)
	} else {
		ctx, cancel = context.WithCancel(ctx)
	}
	st := &serverStream{
		t:       t,
		id:      id,
		cancel:  cancel,
		method:  "/" + trimSlash(ns.GetMethodName()),
		kind:    kind,
		handler: handler,
		codec:   t.opts.serverCodec(),
		comp:    comp,
	}
	ctx = metadata.NewIncomingContext(ctx, md)
	st.ctx = grpcServerTransportContext(ctx, st)
	st.done = ctx.Done()
	var recvWin *flowcontrol.RecvWindow
	if flowControl {
		peerWindow := ns.GetInitialWindowSize()
		if peerWindow == 0 {
			peerWindow = flowcontrol.DefaultWindow
		}
		st.window = flowcontrol.NewSendWindow(peerWindow)
		recvWin = t.opts.newRecvWindow(&t.hint)
	} else {
		st.window = flowcontrol.Unlimited()
	}
	st.in = newInbound(recvWin, int(t.opts.initialWindow), t.opts.maxRecvMsgSize, &t.buffered, "request")
	return st, nil
}

func trimSlash(s string) string {
	if len(s) > 0 && s[0] == '/' {
		return s[1:]
	}
	return s
}

// announceDrain tells the client of the drain, with the drain extension:
// the client then starts no more calls here and ends the tunnel when its
// calls are done. Without it, new calls are refused with Unavailable and the
// tunnel ends as soon as it is idle. endSide.
func (t *tunnelServer) announceDrain() {
	if t.agreed.drain {
		t.out.Queue(serverFramer(settingsStreamID).headers(&tunnelpb.Metadata{}))
	}
}

// endIdle ends a drained tunnel cleanly. A network client half-closes the
// outer stream and lets the peer end it; a network server ends it itself.
// endSide.
func (t *tunnelServer) endIdle() {
	if t.closeSend == nil {
		t.shutdown(nil)
		return
	}
	err := t.out.Do(nil, func(func(*tunnelpb.ServerToClient) error) error { return t.closeSend() })
	if err != nil {
		// The half-close failed, so the peer will not end the stream: end
		// the tunnel here, keeping why (a failed sender has ended it with
		// its cause already; shutdown runs once).
		t.shutdown(tunnelFailure(err))
	}
}

// closing has nothing to take as the tunnel closes: handlers see their
// contexts cancelled, and leave the table as they finish. endSide.
func (t *tunnelServer) closing(error) func() { return nil }
