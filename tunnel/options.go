package tunnel

import (
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

const (
	// defaultMaxRecvMsgSize matches gRPC's own default.
	defaultMaxRecvMsgSize = 4 << 20
	// defaultMaxSendMsgSize matches gRPC's own default: no limit of its own.
	defaultMaxSendMsgSize = 1<<31 - 1
	// defaultMaxWindow is how far a stream's receive window may grow: as
	// far as gRPC lets an HTTP/2 stream window grow, so that the tunnel
	// never caps a stream below what the connection under it carries.
	defaultMaxWindow = 16 << 20
	// defaultMaxChunk is the chunk size two ends of this package use: large
	// enough that a big message costs few frames, small enough that one
	// stream's chunk delays another's by well under a millisecond.
	defaultMaxChunk = 256 << 10
	// defaultMaxConcurrentStreams bounds the calls in progress on a tunnel.
	defaultMaxConcurrentStreams = 1000
	// defaultMaxHeaderListSize bounds the metadata of one header block,
	// counted as HTTP/2 does (name, value and 32 bytes per entry).
	defaultMaxHeaderListSize = 64 << 10
	// defaultMaxBufferedBytes bounds what a tunnel holds for its readers:
	// four streams' worth of fully grown windows.
	defaultMaxBufferedBytes = 64 << 20
	// defaultKeepaliveInterval and defaultKeepaliveTimeout: a silent tunnel
	// is pinged after 20 seconds and given up 10 seconds later, so that a
	// hung peer or a dead path is noticed within half a minute, at the cost
	// of one small frame each way per idle tunnel every 20 seconds.
	defaultKeepaliveInterval = 20 * time.Second
	defaultKeepaliveTimeout  = 10 * time.Second
	// windowIdle is how long a stream may go without consuming before its
	// grown window falls back to the initial size.
	windowIdle = time.Second
)

// TunnelOption configures one end of a tunnel: a channel made by NewChannel,
// a ReverseTunnelServer, or (through TunnelServiceHandlerOptions) the tunnels
// a TunnelServiceHandler accepts.
type TunnelOption interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

// options is the resolved configuration of one tunnel end.
type options struct {
	disableFlowControl bool
	initialWindow      uint32
	maxWindow          uint32
	maxChunk           int
	maxRecvMsgSize     int
	maxSendMsgSize     int
	maxStreams         int
	maxHeaderListSize  int
	maxBuffered        int64
	keepaliveInterval  time.Duration
	keepaliveTimeout   time.Duration
	unknownHandler     grpc.StreamHandler
	codec              encoding.CodecV2
	ic                 interceptors  // see interceptors.go
	serverStats        stats.Handler // see stats.go
	clientStats        stats.Handler
	// plain turns off every extension so that this end behaves exactly as
	// a peer that implements only the published protocol. Tests use it to
	// prove compatibility.
	plain bool

	// acceptOnce builds acceptResp, the response headers accept sends: to
	// a peer that lists no extensions, and to one that does. Every tunnel
	// shares them; nothing writes to them once built.
	acceptOnce sync.Once
	acceptResp [2]metadata.MD
}

func newOptions(opts []TunnelOption) *options {
	o := &options{
		initialWindow:     flowcontrol.DefaultWindow,
		maxWindow:         defaultMaxWindow,
		maxChunk:          defaultMaxChunk,
		maxRecvMsgSize:    defaultMaxRecvMsgSize,
		maxSendMsgSize:    defaultMaxSendMsgSize,
		maxStreams:        defaultMaxConcurrentStreams,
		maxHeaderListSize: defaultMaxHeaderListSize,
		maxBuffered:       defaultMaxBufferedBytes,
		keepaliveInterval: defaultKeepaliveInterval,
		keepaliveTimeout:  defaultKeepaliveTimeout,
	}
	for _, opt := range opts {
		if opt != nil {
			opt.apply(o)
		}
	}
	return o
}

// WithDisableFlowControl makes this end speak protocol revision zero, which
// has no per-stream flow control. Use it only to talk to peers that cannot
// negotiate revision one correctly: without flow control a slow stream holds
// up every other stream on the tunnel.
func WithDisableFlowControl() TunnelOption {
	return optionFunc(func(o *options) { o.disableFlowControl = true })
}

// WithInitialWindowSize sets how many bytes the peer may send on each stream
// before it must wait for this end to consume them (64 KiB by default, at
// least 1 KiB). A larger window lets a single stream go faster over links
// with a long round trip, at the cost of buffering up to that much per
// stream.
func WithInitialWindowSize(size uint32) TunnelOption {
	return optionFunc(func(o *options) {
		o.initialWindow = max(min(size, flowcontrol.MaxWindow), flowcontrol.MinWindow)
	})
}

// WithPlainProtocol makes this end use none of this package's protocol
// extensions, exactly as a peer that implements only the published
// grpctunnel.v1 protocol would: 16 KiB chunks, "-bin" metadata as UTF-8
// only, and on a network server a reader goroutine beside each handler. Use
// it to check interoperability, or to measure what the extensions bring.
func WithPlainProtocol() TunnelOption {
	return optionFunc(func(o *options) { o.plain = true })
}

// WithMaxWindowSize sets how far a stream's receive window may grow on its
// own (16 MiB by default). The window starts at the initial size and doubles
// whenever nearly all of it arrives within one round trip, which means it,
// rather than the network or the application, is what holds the stream back,
// as on links with a long round trip; it falls back after a second without
// traffic. Set it to the initial window size to keep windows fixed. It bounds
// what one stream may buffer when its reader stalls.
func WithMaxWindowSize(size uint32) TunnelOption {
	return optionFunc(func(o *options) { o.maxWindow = min(size, flowcontrol.MaxWindow) })
}

// WithMaxChunkSize sets the largest message chunk this end sends and accepts
// when the peer also runs this package (256 KiB by default). Larger chunks
// cost fewer frames per message; smaller ones interleave streams more finely.
// Peers that speak only the plain protocol always get 16 KiB chunks, and
// values below that are raised to it.
func WithMaxChunkSize(size int) TunnelOption {
	return optionFunc(func(o *options) { o.maxChunk = max(size, flowcontrol.MaxChunk) })
}

// newRecvWindow returns the receive window for one direction of a new
// stream, starting from what the tunnel's earlier streams learned.
func (o *options) newRecvWindow(hint *flowcontrol.Hint) *flowcontrol.RecvWindow {
	w := flowcontrol.NewRecvWindow(o.initialWindow, o.initialWindow)
	w.AutoTune(o.maxWindow, windowIdle, hint)
	return w
}

// WithMaxConcurrentStreams sets how many calls may be in progress on one
// tunnel at once (1000 by default). On the end that handles calls, a call
// beyond it is refused with ResourceExhausted; on the end that issues them,
// a call beyond it fails with ResourceExhausted before anything is sent.
// Callers that want to wait rather than fail can retry with backoff.
func WithMaxConcurrentStreams(n int) TunnelOption {
	return optionFunc(func(o *options) { o.maxStreams = max(n, 1) })
}

// WithMaxHeaderListSize sets the largest block of metadata (request headers,
// response headers or trailers) this end accepts, counted as HTTP/2 counts
// it: the length of each name and value plus 32 bytes per entry (64 KiB by
// default). A call that receives more fails with ResourceExhausted.
func WithMaxHeaderListSize(n int) TunnelOption {
	return optionFunc(func(o *options) { o.maxHeaderListSize = max(n, 1024) })
}

// WithMaxBufferedBytes bounds the data one tunnel holds that its readers have
// not consumed yet, across all its calls and partial messages included
// (64 MiB by default). Windows bound each call; this bounds their sum, so a
// peer cannot multiply its allowance by opening more calls. A chunk that
// would exceed it fails its call with ResourceExhausted. Messages of a call
// that the application abandons, neither reading it to the end nor
// cancelling it, stay counted until the tunnel ends, as gRPC keeps such a
// call's resources.
func WithMaxBufferedBytes(n int64) TunnelOption {
	return optionFunc(func(o *options) { o.maxBuffered = max(n, flowcontrol.DefaultWindow) })
}

// WithKeepalive makes this end ping the peer after interval without hearing
// from it, and give the tunnel up as dead when timeout passes after that with
// still nothing: calls on it fail with Unavailable and a reverse tunnel
// leaves its handler's pool. It finds what TCP alone may not for a long
// time: a half-open connection, a hung peer, a peer whose tunnel is stuck.
// The default is 20 seconds and 10 more, so that a silent peer is given up
// within half a minute; an interval of 0 turns pinging off (this end still
// answers the peer's pings). It needs a peer of this package (the
// keepalive extension); with a plain peer use gRPC's own keepalive on the
// connection (grpc.WithKeepaliveParams, grpc.KeepaliveParams). A network
// server whose peer is given up returns from the tunnel's handler, which
// ends the outer stream and releases a send blocked on it: every goroutine
// of the tunnel is gone within the interval and twice the timeout. For that
// it reads each tunnel's frames on a goroutine beside the handler's; with
// pinging off (and the tunnel-close extension agreed), the handler's own
// goroutine reads, one goroutine less per tunnel.
func WithKeepalive(interval, timeout time.Duration) TunnelOption {
	return optionFunc(func(o *options) {
		o.keepaliveInterval, o.keepaliveTimeout = max(interval, 0), max(timeout, 0)
	})
}

// WithUnknownServiceHandler makes the end that handles calls pass every call
// for a service it has not registered to h, as grpc.UnknownServiceHandler
// does for a *grpc.Server; a proxy (see package proxy) is the usual h. For a
// TunnelServiceHandler, give it in TunnelServiceHandlerOptions.TunnelOptions;
// forward tunnels are then accepted even with no service registered.
func WithUnknownServiceHandler(h grpc.StreamHandler) TunnelOption {
	return optionFunc(func(o *options) { o.unknownHandler = h })
}

// WithCodec sets the codec the end that handles calls decodes requests and
// encodes responses with (gRPC's proto codec by default), as
// grpc.ForceServerCodecV2 does for a *grpc.Server. A proxy needs its own
// (proxy.Codec), which passes messages through as bytes. Callers choose
// their codec per call, with grpc.ForceCodecV2.
func WithCodec(c encoding.CodecV2) TunnelOption {
	return optionFunc(func(o *options) { o.codec = c })
}

// WithMaxRecvMsgSize sets the largest message this end accepts on a tunneled
// call (4 MiB by default, as in gRPC). A larger message fails the call with
// ResourceExhausted as soon as its size is known, before it is buffered. A
// call can lower or raise it with grpc.MaxCallRecvMsgSize.
func WithMaxRecvMsgSize(size int) TunnelOption {
	return optionFunc(func(o *options) { o.maxRecvMsgSize = size })
}

// WithMaxSendMsgSize sets the largest message this end sends on a tunneled
// call (unlimited by default, as in gRPC); a larger one fails with
// ResourceExhausted. A call can change it with grpc.MaxCallSendMsgSize.
func WithMaxSendMsgSize(size int) TunnelOption {
	return optionFunc(func(o *options) { o.maxSendMsgSize = size })
}
