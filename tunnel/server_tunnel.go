package tunnel

import (
	"context"
	"sync"
	"sync/atomic"
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
	Send(*tunnelpb.ServerToClient) error
	Recv() (*tunnelpb.ClientToServer, error)
}

// tunnelServer is the end of a tunnel that handles calls: the network server
// of a forward tunnel, the network client of a reverse one. Each call runs
// its handler in a goroutine of its own, as in grpc.Server.
type tunnelServer struct {
	ctx     context.Context // parent of every handler's context
	cancel  context.CancelFunc
	frames  serverFrames
	out     *sender[*tunnelpb.ServerToClient]
	opts    *options
	svc     *services
	agreed  agreement
	reverse bool
	peer    *peer.Peer
	// conn reports the tunnel to the server stats handler.
	conn tunnelStats
	// closeSend, set on a network client, ends the outer stream cleanly
	// once a drained tunnel is idle; a network server just returns.
	closeSend func() error
	// abort, set on a network client, cancels the outer stream so that a
	// blocked read returns when the tunnel ends for any other reason.
	abort context.CancelFunc
	// askPeerToClose is set on a network server that reads on its handler
	// goroutine: ending the tunnel then means asking the network client to
	// end the outer stream (tunnel-close extension). Set before serve
	// starts any goroutine, and never changed after.
	askPeerToClose bool

	// hint carries window growth from one stream to the next.
	hint flowcontrol.Hint
	// buffered bounds the unread data of all streams together.
	buffered budget
	// ka watches for a silent peer; set before reading starts, under mu.
	ka *keepalive
	// peerDead is set when ka gives the peer up, before the tunnel ends.
	peerDead atomic.Bool
	// counters feed info.
	counters tunnelCounters

	// Reader-owned.
	lastID int64

	mu       sync.Mutex
	streams  map[int64]*serverStream
	closed   bool
	draining bool
	handlers sync.WaitGroup

	// workers run the calls' handlers on goroutines kept for the next
	// call, whose stacks earlier calls already grew.
	workers *workers.Pool[*serverStream]

	done chan struct{}
	err  error
	once sync.Once
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
		peer:    p,
		ctx:     ctx,
		cancel:  cancel,
		frames:  frames,
		opts:    o,
		svc:     svc,
		agreed:  a,
		reverse: reverse,
		streams: map[int64]*serverStream{},
		workers: workers.New((*serverStream).run, maxIdleWorkers, workerIdle),
		done:    make(chan struct{}),
	}
	t.ctx = t.conn.begin(o.serverStats, ctx, p, false)
	t.out = newSender(frames.Send, func(err error) { t.shutdown(tunnelFailure(err)) })
	t.out.ended = t.done
	t.buffered.limit = o.maxBuffered
	t.counters.openedAt = time.Now()
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
	if t.agreed.keepalive {
		t.mu.Lock()
		if !t.closed {
			t.ka = startKeepalive(t.opts.keepaliveInterval, t.opts.keepaliveTimeout, func(v uint32) {
				t.out.Queue(serverFramer(settingsStreamID).windowUpdate(v))
			}, func(err error) {
				t.peerDead.Store(true)
				t.shutdown(err)
			})
		}
		t.mu.Unlock()
	}
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
		// background once the return has released it. (With tunnel-close
		// the handler's goroutine reads, and a silent peer holds it in
		// Recv anyway, until the connection closes; see WithKeepalive.)
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
	return receiveFrames(t.frames.Recv, t.ka, t.dispatch, t.done, func() error { return t.err }, &t.counters.received)
}

func (t *tunnelServer) dispatch(f *tunnelpb.ClientToServer) error {
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
		if id == settingsStreamID && t.agreed.keepalive {
			if fr.WindowUpdate&pingBit != 0 {
				t.out.Queue(serverFramer(settingsStreamID).windowUpdate(fr.WindowUpdate &^ pingBit))
			}
			return nil
		}
	}
	t.mu.Lock()
	st := t.streams[id]
	t.mu.Unlock()
	if st == nil {
		if id > 0 && id <= t.lastID {
			return nil // a stream that ended; its frames race with the end
		}
		return protocolErrorf("frame for stream %d, which was never opened", id)
	}
	switch fr := f.GetFrame().(type) {
	case *tunnelpb.ClientToServer_RequestMessage:
		st.onMessage(fr.RequestMessage.GetSize(), fr.RequestMessage.GetData())
	case *tunnelpb.ClientToServer_MoreRequestData:
		st.onMoreData(fr.MoreRequestData)
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
	case t.closed || t.draining && !t.agreed.drain:
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
	t.streams[id] = st
	t.counters.started++
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
		return nil, status.Errorf(codes.Unimplemented, "grpctunnel: protocol revision %v is not supported on this tunnel", rev)
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
			return nil, status.Error(codes.InvalidArgument, "grpctunnel: "+err.Error())
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

// forget drops a finished stream; a draining tunnel with no streams left
// then ends, unless the client was told of the drain: then the client ends
// it, once it has no call left, since only it knows that no new call is on
// its way.
func (t *tunnelServer) forget(id int64) {
	t.mu.Lock()
	delete(t.streams, id)
	idle := t.draining && !t.agreed.drain && len(t.streams) == 0 && !t.closed
	t.mu.Unlock()
	if idle {
		t.endIdle()
	}
}

// drain ends the tunnel once the calls in progress are over. With the drain
// extension it tells the client, which starts no more calls here and ends
// the tunnel when its calls are done; without it, new calls are refused
// with Unavailable and the tunnel ends as soon as it is idle.
func (t *tunnelServer) drain() {
	t.mu.Lock()
	wasDraining := t.draining
	t.draining = true
	idle := len(t.streams) == 0 && !t.closed
	t.mu.Unlock()
	switch {
	case wasDraining:
	case t.agreed.drain:
		t.out.Queue(serverFramer(settingsStreamID).headers(&tunnelpb.Metadata{}))
	case idle:
		t.endIdle()
	}
}

// endIdle ends a drained tunnel cleanly. A network client half-closes the
// outer stream and lets the peer end it; a network server ends it itself.
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

// shutdown ends the tunnel: handlers see their contexts cancelled.
func (t *tunnelServer) shutdown(err error) {
	t.once.Do(func() {
		t.mu.Lock()
		t.closed = true
		t.err = err
		ka := t.ka
		askPeer := t.askPeerToClose
		t.mu.Unlock()
		ka.stop()
		t.cancel()
		if t.abort != nil {
			t.abort()
		}
		if askPeer {
			t.out.Queue(serverFramer(settingsStreamID).closeStream(statusOf(nil), nil))
		}
		t.conn.end(false)
		close(t.done)
	})
}
