package tunnel

import (
	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

const (
	// defaultMaxRecvMsgSize matches gRPC's own default.
	defaultMaxRecvMsgSize = 4 << 20
	// defaultMaxSendMsgSize matches gRPC's own default: no limit of its own.
	defaultMaxSendMsgSize = 1<<31 - 1
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
	maxRecvMsgSize     int
	maxSendMsgSize     int
	// plain turns off every extension so that this end behaves exactly as
	// a peer that implements only the published protocol. Tests use it to
	// prove compatibility.
	plain bool
}

func newOptions(opts []TunnelOption) *options {
	o := &options{
		initialWindow:  flowcontrol.DefaultWindow,
		maxRecvMsgSize: defaultMaxRecvMsgSize,
		maxSendMsgSize: defaultMaxSendMsgSize,
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
