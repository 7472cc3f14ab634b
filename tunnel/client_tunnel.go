package tunnel

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// TunnelChannel is one tunnel, seen from the end that issues calls through
// it. Use it as you would a *grpc.ClientConn: generated stubs, all four kinds
// of RPC, metadata, deadlines and call options work unchanged. Every call
// made through it reaches the one peer that holds the tunnel.
type TunnelChannel interface {
	grpc.ClientConnInterface

	// Close ends the tunnel at once. Calls in progress fail with
	// Unavailable.
	Close()
	// Context is the tunnel's context. On the end that accepted the tunnel
	// it carries what the opening RPC carried: its peer (peer.FromContext),
	// its metadata (metadata.FromIncomingContext) and anything server
	// interceptors stored; that is how an AffinityKey function identifies
	// the client. It is cancelled when the tunnel ends.
	Context() context.Context
	// Done is closed when the tunnel has ended.
	Done() <-chan struct{}
	// Err reports why the tunnel ended: nil while it is open, and nil if it
	// was closed on purpose (Close, a clean end from the peer, or a drain).
	Err() error
	// Info describes the tunnel now: its peer, affinity key, calls in
	// progress, bytes carried each way and the protocol revision and
	// extensions in use. See TunnelInfo.
	Info() TunnelInfo
}

// clientFrames is the outer stream as the tunnel client sees it, whichever
// end dialled.
type clientFrames interface {
	Send(*tunnelpb.ClientToServer) error
	// RecvMsg receives into a *receivedServerFrame.
	RecvMsg(any) error
}

// tunnelClient is the end of a tunnel that issues calls: the network client
// of a forward tunnel, the network server of a reverse one.
type tunnelClient struct {
	ctx      context.Context
	cancel   context.CancelFunc
	frames   clientFrames
	out      *sender[*tunnelpb.ClientToServer]
	opts     *options
	agreed   agreement
	reverse  bool
	peer     *peer.Peer
	openedMD metadata.MD // outgoing metadata of a forward tunnel's opening RPC

	// hint carries window growth from one stream to the next.
	hint flowcontrol.Hint
	// buffered bounds the unread data of all streams together.
	buffered budget
	// ka watches for a silent peer; set by the reader once the tunnel is
	// ready, under mu.
	ka *keepalive
	// peerDead is set when ka gives the peer up, before the tunnel ends.
	peerDead atomic.Bool
	// counters feed Info.
	counters tunnelCounters
	// conn reports the tunnel to the client stats handler.
	conn tunnelStats

	// Fixed once ready is closed.
	flowControl bool
	peerWindow  uint32 // initial send window of each new stream

	// load is len(streams) and refusing is closed || draining, kept as
	// atomics beside them so that a pool can pick a tunnel without taking
	// every tunnel's lock. Both change only under mu.
	load     atomic.Int32
	refusing atomic.Bool

	mu       sync.Mutex
	streams  map[int64]*clientStream
	lastID   int64
	closed   bool
	draining bool
	onClose  func() // runs once as the tunnel ends, before done closes
	// affinityKey is a handler's key for a reverse tunnel, for Info.
	affinityKey any
	// askPeerToClose is set on a network server that reads on its handler
	// goroutine: ending the tunnel then means asking the network client to
	// end the outer stream (tunnel-close extension). Under mu: the handler
	// clears it while a keepalive, a failed send or Close may be ending the
	// tunnel from another goroutine.
	askPeerToClose bool

	ready chan struct{} // closed once settings arrived (or none are due)
	done  chan struct{}
	err   error // why the tunnel ended; set before done closes
	once  sync.Once
}

func newTunnelClient(ctx context.Context, cancel context.CancelFunc, frames clientFrames, o *options, a agreement, reverse bool, p *peer.Peer) *tunnelClient {
	t := &tunnelClient{
		ctx:     ctx,
		cancel:  cancel,
		frames:  frames,
		opts:    o,
		agreed:  a,
		reverse: reverse,
		peer:    p,
		streams: map[int64]*clientStream{},
		ready:   make(chan struct{}),
		done:    make(chan struct{}),
	}
	t.ctx = t.conn.begin(o.clientStats, ctx, p, true)
	t.out = newSender(frames.Send, func(err error) { t.shutdown(tunnelFailure(err)) })
	t.out.ended = t.done
	t.buffered.limit = o.maxBuffered
	t.counters.openedAt = time.Now()
	if !a.negotiated {
		close(t.ready)
	}
	return t
}

// serverRole names the peer in error messages, which must say which end of
// a reverse tunnel is meant.
func (t *tunnelClient) serverRole() string {
	if t.reverse {
		return "tunnel server (network client)"
	}
	return "server"
}

// readLoop reads frames until the outer stream ends, then ends the tunnel.
func (t *tunnelClient) readLoop() {
	err := t.handshake()
	if err == nil {
		err = t.readFrames()
	}
	t.shutdown(err)
}

// handshake reads the settings frame, when one is due, and makes the tunnel
// ready for calls.
func (t *tunnelClient) handshake() error {
	if t.agreed.negotiated {
		if err := t.readSettings(); err != nil {
			return err
		}
	}
	if t.agreed.keepalive {
		t.mu.Lock()
		if !t.closed {
			t.ka = startKeepalive(t.opts.keepaliveInterval, t.opts.keepaliveTimeout, func(v uint32) {
				t.out.Queue(clientFramer(settingsStreamID).windowUpdate(v))
			}, func(err error) {
				t.peerDead.Store(true)
				t.shutdown(err)
			})
		}
		t.mu.Unlock()
	}
	return nil
}

// readFrames dispatches frames until the outer stream ends.
func (t *tunnelClient) readFrames() error {
	return receiveFrames(t.frames.RecvMsg, new(receivedServerFrame), t.ka, t.dispatch, t.done, func() error { return t.err }, &t.counters.received)
}

func (t *tunnelClient) readSettings() error {
	f := new(tunnelpb.ServerToClient)
	if err := t.frames.RecvMsg(f); err != nil {
		return tunnelFailure(err)
	}
	s := f.GetSettings()
	if s == nil || f.GetStreamId() != settingsStreamID {
		return protocolErrorf("the %s did not send settings first", t.serverRole())
	}
	rev, err := chooseRevision(s.GetSupportedProtocolRevisions())
	if err != nil {
		return protocolErrorf("%v", err)
	}
	t.flowControl = rev == tunnelpb.ProtocolRevision_REVISION_ONE
	t.peerWindow = s.GetInitialWindowSize()
	if t.peerWindow == 0 {
		t.peerWindow = flowcontrol.DefaultWindow
	}
	close(t.ready)
	return nil
}

func (t *tunnelClient) dispatch(f *receivedServerFrame) error {
	id := f.GetStreamId()
	if _, ok := f.GetFrame().(*tunnelpb.ServerToClient_Settings); ok {
		return protocolErrorf("settings received again (stream %d)", id)
	}
	if _, ok := f.GetFrame().(*tunnelpb.ServerToClient_CloseStream); ok && id == settingsStreamID && t.agreed.tunnelClose && !t.reverse {
		return errPeerClosed
	}
	if f.GetFrame() == nil {
		return protocolErrorf("frame of unknown type for stream %d", id)
	}
	if _, ok := f.GetFrame().(*tunnelpb.ServerToClient_ResponseHeaders); ok && id == settingsStreamID && t.agreed.drain {
		// The server is draining (drain extension): no new call here, and
		// the tunnel ends once the calls in progress are done.
		t.drain()
		return nil
	}
	if v, ok := f.GetFrame().(*tunnelpb.ServerToClient_WindowUpdate); ok && id == settingsStreamID && t.agreed.keepalive {
		if v.WindowUpdate&pingBit != 0 {
			t.out.Queue(clientFramer(settingsStreamID).windowUpdate(v.WindowUpdate &^ pingBit))
		}
		return nil
	}
	t.mu.Lock()
	st := t.streams[id]
	last := t.lastID
	t.mu.Unlock()
	if st == nil {
		if id > 0 && id <= last {
			return nil // a stream that ended; its frames race with the end
		}
		return protocolErrorf("frame for stream %d, which was never opened", id)
	}
	switch fr := f.GetFrame().(type) {
	case *tunnelpb.ServerToClient_ResponseHeaders:
		st.onHeaders(fr.ResponseHeaders)
	case *tunnelpb.ServerToClient_ResponseMessage:
		st.onMessage(fr.ResponseMessage.GetSize(), f.payload())
	case *tunnelpb.ServerToClient_MoreResponseData:
		st.onMoreData(f.payload())
	case *tunnelpb.ServerToClient_CloseStream:
		st.onClose(fr.CloseStream)
	case *tunnelpb.ServerToClient_WindowUpdate:
		if err := st.window.Add(fr.WindowUpdate); err != nil {
			st.abort(windowOverflow(err), true)
		}
	}
	return nil
}

// register allocates the next stream ID and sends the stream's first
// frames, under one hold of the sender so IDs reach the peer in increasing
// order: the new_stream ns and, if only is not nil, the call's one request
// message and the half-close.
//
// Waiting for the sender ends with ctx: the call then fails with its
// context's status, like a call whose context ends at any other point of its
// start.
func (t *tunnelClient) register(ctx context.Context, st *clientStream, ns *tunnelpb.NewStream, only []byte) error {
	err := t.out.hold(ctx.Done())
	if err == nil {
		err = t.registerHeld(st, ns, only)
		t.out.release()
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errDone):
		return status.FromContextError(ctx.Err()).Err()
	case errors.Is(err, errTooManyStreams):
		return unstarted(err)
	default:
		return unstarted(t.unavailable())
	}
}

func (t *tunnelClient) registerHeld(st *clientStream, ns *tunnelpb.NewStream, only []byte) error {
	t.mu.Lock()
	if t.closed || t.draining {
		t.mu.Unlock()
		return errTunnelClosed
	}
	if len(t.streams) >= t.opts.maxStreams {
		t.mu.Unlock()
		return errTooManyStreams
	}
	t.lastID++
	id := t.lastID
	st.id = id
	t.streams[id] = st
	t.load.Add(1)
	t.counters.started++
	t.mu.Unlock()
	fr := clientFramer(id)
	err := t.out.sendLocked(fr.newStream(ns))
	if err == nil && only != nil {
		err = t.out.sendLocked(fr.message(uint32(len(only)), only))
		if err == nil {
			err = t.out.sendLocked(fr.halfClose())
		}
	}
	if err != nil {
		t.forget(id)
	}
	return err
}

// forget drops a stream from the table; a draining tunnel with no streams
// left then ends.
func (t *tunnelClient) forget(id int64) {
	t.mu.Lock()
	if _, ok := t.streams[id]; ok {
		delete(t.streams, id)
		t.load.Add(-1)
	}
	idle := t.draining && len(t.streams) == 0
	t.mu.Unlock()
	if idle {
		t.shutdown(nil)
	}
}

// unavailable is the status of a call that cannot use this tunnel.
func (t *tunnelClient) unavailable() error {
	select {
	case <-t.done:
		return t.unavailableAfter(t.err)
	default:
		return status.Errorf(codes.Unavailable, "grpctunnel: %s is shutting down", t.describe())
	}
}

// drain refuses new calls and ends the tunnel once the calls in progress are
// over.
func (t *tunnelClient) drain() {
	t.mu.Lock()
	t.draining = true
	t.refusing.Store(true)
	idle := len(t.streams) == 0
	t.mu.Unlock()
	if idle {
		t.shutdown(nil)
	}
}

// room reports whether the tunnel takes new calls now, and how many it
// carries. It takes no lock: a pool asks it of many tunnels per call.
func (t *tunnelClient) room() (load int, ok bool) {
	load = int(t.load.Load())
	return load, !t.refusing.Load() && load < t.opts.maxStreams
}

// shutdown ends the tunnel: every call in progress fails with Unavailable
// and the tunnel's context is cancelled. The outer stream is released by its
// owner once done is closed.
func (t *tunnelClient) shutdown(err error) {
	t.once.Do(func() {
		t.mu.Lock()
		t.closed = true
		t.refusing.Store(true)
		t.err = err
		streams := t.streams
		t.streams = map[int64]*clientStream{}
		t.load.Store(0)
		ka := t.ka
		askPeer := t.askPeerToClose
		t.mu.Unlock()
		ka.stop()
		t.cancel()
		if askPeer {
			t.out.Queue(clientFramer(settingsStreamID).cancel())
		}
		gone := t.unavailableAfter(err)
		for _, st := range streams {
			st.abort(gone, false)
		}
		if t.onClose != nil {
			t.onClose()
		}
		t.conn.end(true)
		close(t.done)
	})
}

// shutdownHere ends a tunnel whose network server is about to return from
// the opening RPC with a status of its own: that return ends the outer
// stream, so the client is not asked to close it. If the tunnel is already
// ending, it ends as that began.
func (t *tunnelClient) shutdownHere() {
	t.mu.Lock()
	t.askPeerToClose = false
	t.mu.Unlock()
	t.shutdown(nil)
}

// unavailableAfter is the status of calls on a tunnel that ended with err:
// Unavailable, saying which tunnel (its peer and, for a reverse tunnel, its
// affinity key) and what happened to it, so that a caller several hops
// away learns which peer went and how.
func (t *tunnelClient) unavailableAfter(err error) error {
	return status.Errorf(codes.Unavailable, "grpctunnel: %s %s", t.describe(), endReason(err))
}

// describe names the tunnel in error messages.
func (t *tunnelClient) describe() string {
	var b strings.Builder
	if t.reverse {
		b.WriteString("reverse tunnel")
		if t.peer != nil && t.peer.Addr != nil {
			b.WriteString(" from ")
			b.WriteString(t.peer.Addr.String())
		}
		t.mu.Lock()
		key := t.affinityKey
		t.mu.Unlock()
		if key != nil {
			b.WriteString(" (key ")
			b.WriteString(errtext.QuoteAny(key))
			b.WriteString(")")
		}
	} else {
		b.WriteString("tunnel")
		if t.peer != nil && t.peer.Addr != nil {
			b.WriteString(" to ")
			b.WriteString(t.peer.Addr.String())
		}
	}
	return b.String()
}

// TunnelChannel implementation.

func (t *tunnelClient) Close()                   { t.shutdown(nil) }
func (t *tunnelClient) Context() context.Context { return t.ctx }
func (t *tunnelClient) Done() <-chan struct{}    { return t.done }

func (t *tunnelClient) Err() error {
	select {
	case <-t.done:
		return t.err
	default:
		return nil
	}
}

// authInfo describes the security of the connection under the tunnel, for
// per-RPC credentials that insist on a secure transport.
func (t *tunnelClient) authInfo() credentials.AuthInfo {
	if t.peer == nil {
		return nil
	}
	return t.peer.AuthInfo
}
