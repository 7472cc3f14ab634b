package tunnel

import (
	"context"
	"net"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// A tunnel reports to stats.Handlers what grpc-go reports for a connection
// and its calls, so that OpenTelemetry (otelgrpc), Prometheus exporters and
// anything else written against stats.Handler see tunneled calls as they
// see direct ones. The tunnel plays the connection: TagConn, ConnBegin and
// ConnEnd bracket its life. Each call is tagged with TagRPC and reported in
// grpc-go's order:
//
//	issuing end:  Begin, OutHeader, OutPayload..., InHeader, InPayload..., InTrailer, End
//	handling end: InHeader, Begin, InPayload..., OutHeader, OutPayload..., OutTrailer, End
//
// Events of the two directions interleave as the call goes, and, as in
// grpc-go, the tunnel's reader reports InHeader and InTrailer while the
// caller reports InPayload as it reads, so InTrailer may come before the
// last InPayload. End comes last either way, and once it has been reported
// nothing more is: a call whose context ends is over for its handlers even
// if the caller never reads its result.
//
// Payload sizes are the message's encoded length (Length) and the bytes it
// took in the tunnel's chunks (CompressedLength and WireLength, which differ
// from Length only when the message was compressed); header and trailer
// WireLength is the size of the encoded metadata in its frame. Frame
// overhead is not counted, as gRPC does not count HTTP/2's.

// WithStatsHandler reports the calls this end handles, and its tunnels, to
// h, as grpc.StatsHandler does for a *grpc.Server: give it
// otelgrpc.NewServerHandler() and every tunneled call gets a server span
// whose parent is the caller's span, carried in the call's metadata. It
// applies to a ReverseTunnelServer and to the tunnels a TunnelServiceHandler
// accepts (through TunnelServiceHandlerOptions.TunnelOptions). Several
// handlers may be given; each sees every event, in the order given.
func WithStatsHandler(h stats.Handler) TunnelOption {
	return optionFunc(func(o *options) { o.serverStats = joinStats(o.serverStats, h) })
}

// WithClientStatsHandler reports the calls this end issues through its
// tunnels, and the tunnels themselves, to h, as grpc.WithStatsHandler does
// for a *grpc.ClientConn: give it otelgrpc.NewClientHandler() and every call
// made through the TunnelChannel gets a client span, whose context travels
// to the handling end in the call's metadata. It applies to NewChannel's
// channel and to the reverse tunnels of a TunnelServiceHandler (given in
// TunnelServiceHandlerOptions.TunnelOptions). Several handlers may be given;
// each sees every event, in the order given.
func WithClientStatsHandler(h stats.Handler) TunnelOption {
	return optionFunc(func(o *options) { o.clientStats = joinStats(o.clientStats, h) })
}

// joinStats adds h to the handlers already set; nil adds nothing.
func joinStats(set, h stats.Handler) stats.Handler {
	switch {
	case h == nil:
		return set
	case set == nil:
		return h
	}
	if m, ok := set.(multiStats); ok {
		return append(m[:len(m):len(m)], h)
	}
	return multiStats{set, h}
}

// multiStats passes every event to each of several handlers.
type multiStats []stats.Handler

func (m multiStats) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	for _, h := range m {
		ctx = h.TagRPC(ctx, info)
	}
	return ctx
}

func (m multiStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	for _, h := range m {
		h.HandleRPC(ctx, s)
	}
}

func (m multiStats) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	for _, h := range m {
		ctx = h.TagConn(ctx, info)
	}
	return ctx
}

func (m multiStats) HandleConn(ctx context.Context, s stats.ConnStats) {
	for _, h := range m {
		h.HandleConn(ctx, s)
	}
}

// tunnelStats reports one tunnel's life; its zero value reports nothing.
type tunnelStats struct {
	h   stats.Handler
	ctx context.Context
}

// begin tags the tunnel's context and reports ConnBegin. It returns the
// tagged context, the parent of everything the tunnel does.
func (s *tunnelStats) begin(h stats.Handler, ctx context.Context, p *peer.Peer, client bool) context.Context {
	if h == nil {
		return ctx
	}
	remote, local := addrs(p)
	ctx = h.TagConn(ctx, &stats.ConnTagInfo{RemoteAddr: remote, LocalAddr: local})
	h.HandleConn(ctx, &stats.ConnBegin{Client: client})
	s.h, s.ctx = h, ctx
	return ctx
}

// end reports ConnEnd; it is called once, as the tunnel ends.
func (s *tunnelStats) end(client bool) {
	if s.h != nil {
		s.h.HandleConn(s.ctx, &stats.ConnEnd{Client: client})
	}
}

func addrs(p *peer.Peer) (remote, local net.Addr) {
	if p == nil {
		return nil, nil
	}
	return p.Addr, p.LocalAddr
}

// callStats reports one call's events. Its zero value reports nothing, so a
// call without handlers pays one nil check per event. Events may come from
// the caller's or handler's goroutine and from the tunnel's reader; none is
// reported once End has been.
type callStats struct {
	h      stats.Handler
	ctx    context.Context // as TagRPC returned it
	client bool
	start  time.Time
	ended  atomic.Bool
}

func (s *callStats) on() bool { return s.h != nil && !s.ended.Load() }

// beginClient tags an issued call and reports Begin; it returns the tagged
// context, from which the call's metadata is then read (a tracing handler
// adds its trace context there).
func (s *callStats) beginClient(h stats.Handler, ctx context.Context, method string, clientStreams, serverStreams, failFast bool) context.Context {
	s.h, s.client, s.start = h, true, time.Now()
	s.ctx = h.TagRPC(ctx, &stats.RPCTagInfo{FullMethodName: method, FailFast: failFast})
	h.HandleRPC(s.ctx, &stats.Begin{
		Client:         true,
		BeginTime:      s.start,
		FailFast:       failFast,
		IsClientStream: clientStreams,
		IsServerStream: serverStreams,
	})
	return s.ctx
}

// beginServer tags a handled call, whose context already carries the
// request metadata, and reports InHeader and Begin.
func (s *callStats) beginServer(h stats.Handler, ctx context.Context, method string, kind methodKind, p *peer.Peer, md metadata.MD, pb *tunnelpb.Metadata, compression string) context.Context {
	s.h, s.start = h, time.Now()
	s.ctx = h.TagRPC(ctx, &stats.RPCTagInfo{FullMethodName: method})
	remote, local := addrs(p)
	h.HandleRPC(s.ctx, &stats.InHeader{
		FullMethod:  method,
		RemoteAddr:  remote,
		LocalAddr:   local,
		Compression: compression,
		WireLength:  metadataSize(pb),
		Header:      md.Copy(),
	})
	h.HandleRPC(s.ctx, &stats.Begin{
		BeginTime:      s.start,
		IsClientStream: kind.clientStreams,
		IsServerStream: kind.serverStreams,
	})
	return s.ctx
}

// outHeader reports headers sent. On the issuing end they are the request
// headers of the call's new_stream.
func (s *callStats) outHeader(method string, p *peer.Peer, md metadata.MD, compression string) {
	if !s.on() {
		return
	}
	ev := &stats.OutHeader{Client: s.client, Header: md.Copy(), Compression: compression}
	if s.client {
		ev.FullMethod = method
		ev.RemoteAddr, ev.LocalAddr = addrs(p)
	}
	s.h.HandleRPC(s.ctx, ev)
}

// inHeader reports response headers received by the issuing end; pb is
// nil when the peer skipped empty headers before its first message.
func (s *callStats) inHeader(md metadata.MD, pb *tunnelpb.Metadata, compression string) {
	if !s.on() {
		return
	}
	s.h.HandleRPC(s.ctx, &stats.InHeader{Client: true, Header: md.Copy(), WireLength: metadataSize(pb), Compression: compression})
}

// inTrailer reports the trailers that came with the call's status.
func (s *callStats) inTrailer(md metadata.MD, pb *tunnelpb.Metadata) {
	if !s.on() {
		return
	}
	s.h.HandleRPC(s.ctx, &stats.InTrailer{Client: true, Trailer: md.Copy(), WireLength: metadataSize(pb)})
}

// outTrailer reports the trailers the handling end sent with the status.
func (s *callStats) outTrailer(md metadata.MD) {
	if !s.on() {
		return
	}
	s.h.HandleRPC(s.ctx, &stats.OutTrailer{Trailer: md.Copy()})
}

// outPayload reports message m sent: length encoded bytes, of which wire
// went into the tunnel.
func (s *callStats) outPayload(m any, length, wire int) {
	if !s.on() {
		return
	}
	s.h.HandleRPC(s.ctx, &stats.OutPayload{
		Client:           s.client,
		Payload:          m,
		Length:           length,
		CompressedLength: wire,
		WireLength:       wire,
		SentTime:         time.Now(),
	})
}

// inPayload reports message m received.
func (s *callStats) inPayload(m any, length, wire int) {
	if !s.on() {
		return
	}
	s.h.HandleRPC(s.ctx, &stats.InPayload{
		Client:           s.client,
		Payload:          m,
		Length:           length,
		CompressedLength: wire,
		WireLength:       wire,
		RecvTime:         time.Now(),
	})
}

// end reports End, once: err is nil for a call that succeeded.
func (s *callStats) end(trailer metadata.MD, err error) {
	if s.h == nil || s.ended.Swap(true) {
		return
	}
	s.h.HandleRPC(s.ctx, &stats.End{
		Client:    s.client,
		BeginTime: s.start,
		EndTime:   time.Now(),
		Trailer:   trailer.Copy(),
		Error:     err,
	})
}

// metadataSize is the encoded size of a metadata frame's payload.
func metadataSize(pb *tunnelpb.Metadata) int {
	if pb == nil {
		return 0
	}
	return proto.Size(pb)
}
