package tunnel

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/grpc"
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
	// SendMsg sends a *tunnelpb.ClientToServer or a *clientDataFrame.
	SendMsg(any) error
	// RecvMsg receives into a *receivedServerFrame.
	RecvMsg(any) error
}

// tunnelClient is the end of a tunnel that issues calls: the network client
// of a forward tunnel, the network server of a reverse one.
type tunnelClient struct {
	tunnelEnd[*tunnelpb.ClientToServer, *clientStream]
	frames   clientFrames
	openedMD metadata.MD // outgoing metadata of a forward tunnel's opening RPC

	// Fixed once ready is closed.
	flowControl bool
	peerWindow  uint32 // initial send window of each new stream

	onClose func() // runs once as the tunnel ends, before done closes
	// affinityKey is a handler's key for a reverse tunnel, for Info; under
	// mu.
	affinityKey any

	ready chan struct{} // closed once settings arrived (or none are due)
}

func newTunnelClient(ctx context.Context, cancel context.CancelFunc, frames clientFrames, o *options, a agreement, reverse bool, p *peer.Peer) *tunnelClient {
	t := &tunnelClient{
		tunnelEnd: tunnelEnd[*tunnelpb.ClientToServer, *clientStream]{
			cancel:  cancel,
			opts:    o,
			agreed:  a,
			reverse: reverse,
			client:  true,
			peer:    p,
			streams: map[int64]*clientStream{},
			done:    make(chan struct{}),
		},
		frames: frames,
		ready:  make(chan struct{}),
	}
	t.begin(t, ctx, o.clientStats, frames.SendMsg, clientFramer(settingsStreamID))
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
	t.watchPeer()
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
	if v, ok := f.GetFrame().(*tunnelpb.ServerToClient_WindowUpdate); ok && t.keepaliveFrame(id, v.WindowUpdate) {
		return nil
	}
	st, ok, err := t.lookup(id)
	if !ok {
		return err
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
	if t.state != endOpen {
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
	t.addLocked(id, st)
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

// unavailable is the status of a call that cannot use this tunnel.
func (t *tunnelClient) unavailable() error {
	select {
	case <-t.done:
		return t.unavailableAfter(t.err)
	default:
		return errTunnelShuttingDown(t.describe())
	}
}

// room reports whether the tunnel takes new calls now, and how many it
// carries. It takes no lock: a pool asks it of many tunnels per call.
func (t *tunnelClient) room() (load int, ok bool) {
	load = int(t.load.Load())
	return load, !t.refusing.Load() && load < t.opts.maxStreams
}

// closing takes the calls in progress out of the table as the tunnel
// closes, and then fails them with Unavailable: endSide.
func (t *tunnelClient) closing(err error) func() {
	streams := t.streams
	t.streams = map[int64]*clientStream{}
	t.load.Store(0)
	return func() {
		gone := t.unavailableAfter(err)
		for _, st := range streams {
			st.abort(gone, false)
		}
		if t.onClose != nil {
			t.onClose()
		}
	}
}

// announceDrain does nothing: the drain signal goes from the tunnel server
// to the client only (drain extension). endSide.
func (t *tunnelClient) announceDrain() {}

// endIdle ends a drained tunnel whose calls are over: endSide.
func (t *tunnelClient) endIdle() { t.shutdown(nil) }

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
	return errTunnelEnded(t.describe(), err)
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
