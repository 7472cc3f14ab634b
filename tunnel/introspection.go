package tunnel

import (
	"fmt"
	"net"
	"slices"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/peer"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// TunnelInfo describes one tunnel at one moment: where it goes, what was
// negotiated when it opened and how much it has carried since. It is a plain
// value, a snapshot, meant for dashboards, admin endpoints, logs and
// debugging; TunnelChannel.Info, TunnelServiceHandler.Tunnels and
// ReverseTunnelServer.Tunnels return it. Reading it costs a lock of the
// tunnel's stream table, never anything on the path of calls.
type TunnelInfo struct {
	// Peer is the network address of the other end of the outer RPC that
	// carries the tunnel, as gRPC reports it (peer.FromContext); nil if
	// unknown.
	Peer net.Addr
	// Reverse is true for a reverse tunnel: one opened with
	// OpenReverseTunnel, whose network server issues the calls.
	Reverse bool
	// Client is true on the end that issues calls through the tunnel (a
	// TunnelChannel), false on the end that handles them.
	Client bool
	// AffinityKey is the key a TunnelServiceHandler's AffinityKey function
	// gave a reverse tunnel it holds; nil anywhere else.
	AffinityKey any
	// OpenedAt is when this end set the tunnel up.
	OpenedAt time.Time

	// OpenStreams is how many calls are in progress on the tunnel now.
	OpenStreams int
	// StreamsStarted is how many calls have started on the tunnel since it
	// opened, counting those that are over; on the handling end, calls it
	// refused are not counted.
	StreamsStarted uint64
	// BytesSent and BytesReceived count the tunneled messages' payload: the
	// encoded message bytes of every call, counted as their chunks are
	// written to, or read from, the outer stream. Headers, trailers,
	// control frames and the outer stream's own framing are not counted, so
	// once the tunnel is quiet what one end sent is what the other
	// received.
	BytesSent, BytesReceived uint64

	// Revision is the protocol revision the tunnel's calls use: 1 when both
	// ends negotiated flow control, 0 otherwise (a plain peer,
	// WithPlainProtocol or WithDisableFlowControl). See PROTOCOL.md.
	Revision int
	// Extensions names the protocol extensions both ends agreed to use, in
	// the form of the grpctunnel-extensions header: "binary-metadata",
	// "max-chunk=N" (N being the largest chunk this end sends, when the
	// peer accepts more than 16 KiB), "tunnel-close", "keepalive",
	// "compression" and "drain". Empty with a plain peer or
	// WithPlainProtocol.
	Extensions []string

	// Draining is true once the tunnel refuses new calls: it is closing, or
	// finishing the calls in progress before it closes.
	Draining bool
	// Closed is true once the tunnel has ended.
	Closed bool
}

// String gives a one-line summary, for logs.
func (i TunnelInfo) String() string {
	kind := "forward"
	if i.Reverse {
		kind = "reverse"
	}
	side := "server"
	if i.Client {
		side = "client"
	}
	return fmt.Sprintf("%s tunnel (%s end) peer=%v key=%v rev=%d ext=%v streams=%d/%d sent=%d received=%d draining=%t closed=%t",
		kind, side, i.Peer, i.AffinityKey, i.Revision, i.Extensions, i.OpenStreams, i.StreamsStarted, i.BytesSent, i.BytesReceived, i.Draining, i.Closed)
}

// tunnelCounters is what both kinds of tunnel end count for TunnelInfo. The
// bytes sent are counted by the sender, which sees every frame written.
type tunnelCounters struct {
	openedAt time.Time
	received atomic.Uint64 // payload bytes read; the reader adds, anyone reads
	started  uint64        // streams started; guarded by the tunnel's mu
}

// extensionNames lists what a agreed, as TunnelInfo.Extensions does.
func (a agreement) extensionNames() []string {
	var ext []string
	if a.binaryMetadata {
		ext = append(ext, extBinaryMetadata)
	}
	if a.maxChunk > flowcontrol.MaxChunk {
		ext = append(ext, fmt.Sprintf("%s=%d", extMaxChunk, a.maxChunk))
	}
	if a.tunnelClose {
		ext = append(ext, extTunnelClose)
	}
	if a.keepalive {
		ext = append(ext, extKeepalive)
	}
	if a.compression {
		ext = append(ext, extCompression)
	}
	if a.drain {
		ext = append(ext, extDrain)
	}
	return ext
}

// tunnelInfo describes the tunnel now, as either end sees it; the caller
// knows its peer's address and the revision its calls use.
func (e *tunnelEnd[F, S]) tunnelInfo(peerAddr net.Addr, revision int) TunnelInfo {
	i := TunnelInfo{
		Peer:          peerAddr,
		Reverse:       e.reverse,
		Client:        e.client,
		OpenedAt:      e.counters.openedAt,
		BytesSent:     e.out.payloadSent.Load(),
		BytesReceived: e.counters.received.Load(),
		Revision:      revision,
		Extensions:    e.agreed.extensionNames(),
	}
	e.mu.Lock()
	i.OpenStreams = len(e.streams)
	i.StreamsStarted = e.counters.started
	i.Draining = e.state != endOpen
	i.Closed = e.state == endClosed
	e.mu.Unlock()
	return i
}

// Info describes the tunnel now; see TunnelInfo.
func (t *tunnelClient) Info() TunnelInfo {
	var addr net.Addr
	if t.peer != nil {
		addr = t.peer.Addr
	}
	revision := 0
	select {
	case <-t.ready:
		if t.flowControl {
			revision = 1
		}
	default:
	}
	i := t.tunnelInfo(addr, revision)
	t.mu.Lock()
	i.AffinityKey = t.affinityKey
	t.mu.Unlock()
	return i
}

// info describes the tunnel now; see TunnelInfo.
func (t *tunnelServer) info() TunnelInfo {
	var addr net.Addr
	if p, ok := peer.FromContext(t.ctx); ok {
		addr = p.Addr
	}
	revision := 0
	if t.agreed.negotiated {
		revision = 1
	}
	return t.tunnelInfo(addr, revision)
}

// Tunnels describes every tunnel the handler holds now: the forward tunnels
// it serves (Client false) and the reverse tunnels it holds (Reverse and
// Client true, with their affinity keys), oldest first. A tunnel leaves the
// list once it has ended. Use it for an admin endpoint or a dashboard that
// shows who is connected and what each tunnel carries.
func (h *TunnelServiceHandler) Tunnels() []TunnelInfo {
	var out []TunnelInfo
	h.forwardTunnels.Range(func(k, _ any) bool {
		out = append(out, k.(*tunnelServer).info())
		return true
	})
	for _, ch := range h.pool.snapshot() {
		out = append(out, ch.Info())
	}
	sortByOpening(out)
	return out
}

// Tunnels describes the reverse tunnels this server has open now, oldest
// first (Reverse true, Client false: this end handles the calls).
func (s *ReverseTunnelServer) Tunnels() []TunnelInfo {
	s.mu.Lock()
	calls := s.snapshot()
	s.mu.Unlock()
	var out []TunnelInfo
	for _, c := range calls {
		if c.t != nil {
			out = append(out, c.t.info())
		}
	}
	sortByOpening(out)
	return out
}

func sortByOpening(infos []TunnelInfo) {
	slices.SortStableFunc(infos, func(a, b TunnelInfo) int { return a.OpenedAt.Compare(b.OpenedAt) })
}
