package gateway

import (
	"context"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/fullstorydev/grpchan"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/agentkey"
	"github.com/grpctunnel/grpctunnel/internal/replica"
	"github.com/grpctunnel/grpctunnel/internal/window"
	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// DefaultKeyHeader is the request header that names an agent, both on the
// agent's tunnels and on the calls routed to it, unless
// Options.KeyHeader says otherwise.
const DefaultKeyHeader = "tunnel-key"

// maxKeyLen bounds an agent's key, which also becomes a metric label.
const maxKeyLen = agentkey.MaxLen

// DefaultMaxStreamsPerConnection is how many calls one client connection
// may have in progress through the gateway unless
// Options.MaxStreamsPerConnection says otherwise: a fifth of what one
// tunnel carries (the grpctunnel agent keeps one by default), so that no
// single connection can take an agent's whole capacity.
const DefaultMaxStreamsPerConnection = 200

// DefaultWindowSize is the HTTP/2 flow-control window of each stream on
// the gateway's connections, callers' and agents' alike, unless
// Options.WindowSize says otherwise. It is fixed rather than sized by
// gRPC's probes, which cost every call two more packets on each hop; see
// Options.WindowSize for what it bounds.
const DefaultWindowSize = window.Default

// Director routes a call that the gateway does not answer itself. It gets
// the gateway so that it can reach agents (Gateway.Agent) or fall back to
// the default routing (Gateway.RouteByKey). A route's metadata is what the
// backend receives; start from the incoming metadata and leave out what
// the backend must not see.
type Director func(ctx context.Context, call *proxy.Call, g *Gateway) (proxy.Route, error)

// Options configure a Gateway. The zero value is a working gateway that
// routes by the tunnel-key header and accepts any agent.
type Options struct {
	// KeyHeader is the header that names agents (DefaultKeyHeader if
	// empty). Agents announce their key in it when they open a tunnel, and
	// callers name the agent in it; it is removed before a call is
	// forwarded. Header names are lower case in gRPC; it is lowered.
	KeyHeader string
	// Director, if set, routes every call that names no local service,
	// instead of RouteByKey.
	Director Director
	// AuthorizeAgent, if set, decides whether an agent may open a tunnel
	// with key. ctx is the opening RPC's: it carries the agent's peer (with
	// its TLS client certificate, if any) and metadata. A non-nil error,
	// ideally a status with code Unauthenticated or PermissionDenied,
	// refuses the tunnel with that status.
	AuthorizeAgent func(ctx context.Context, key string) error
	// AuthorizeCall, if set, decides whether a caller may make a call,
	// before it is routed or answered: ctx is the call's (its peer and
	// metadata), method its full name, and keys the agents it names (none
	// for a call to the gateway's own services). A non-nil error, ideally a
	// status with code Unauthenticated or PermissionDenied, fails the call
	// with that status. Without it, anyone who can reach the gateway may
	// call any agent.
	AuthorizeCall func(ctx context.Context, method string, keys []string) error
	// DropHeaders are removed from a call before it is forwarded, besides
	// the key header: credentials meant for the gateway, for example. Names
	// are lowered.
	DropHeaders []string
	// Logger receives a line for each agent tunnel that opens or closes,
	// and for refused agents, callers and TLS handshakes (see
	// RefusalReason), at most one a second for each kind of refusal
	// (slog.Default() if nil).
	Logger *slog.Logger
	// AccessLog, if set, receives one line at info level for each call
	// that ends at the gateway, forwarded, answered by its own services or
	// refused: its method, key, code, duration, payload bytes each way,
	// the caller's address and verified certificate subject (see
	// AccessLogMessage). It is what tells an operator who called which
	// agent, which metrics cannot do without unbounded labels. Nil writes
	// none and costs nothing.
	AccessLog *slog.Logger
	// Registerer, if set, receives the gateway's Prometheus metrics.
	Registerer prometheus.Registerer
	// MaxMetricKeys bounds how many agent keys get label values of their
	// own in the metrics (100 if zero); later keys share the label "_other",
	// so that keys cannot grow the metrics without bound.
	MaxMetricKeys int
	// MaxStreamsPerConnection bounds the calls in progress on one client
	// connection to the gateway (DefaultMaxStreamsPerConnection if zero;
	// negative for no bound). It is HTTP/2's own limit, so a caller past it
	// waits in its own gRPC client for a call to finish rather than
	// failing; what it protects is the agents' capacity: each agent's
	// tunnels carry a bounded number of calls (see
	// tunnel.WithMaxConcurrentStreams), and without this bound one
	// connection could hold all of them with idle calls and starve every
	// other caller of that agent.
	MaxStreamsPerConnection int
	// MaxMessageSize is the largest message, in bytes, the gateway accepts
	// from callers and from agents (4 MiB, gRPC's default, if zero). Raise
	// the agents' limit too (agent.Options.MaxMessageSize): a request
	// larger than an agent accepts is refused by the agent, and the caller
	// is told which.
	MaxMessageSize int
	// WindowSize is the HTTP/2 flow-control window, in bytes, of each
	// stream on the gateway's connections, callers' and agents' alike
	// (DefaultWindowSize if zero; the connection's is twice as large).
	// A tunnel is one stream, so on a link with round trip RTT one tunnel
	// carries at most WindowSize/RTT toward the gateway (80 MiB/s at 100
	// ms with the default); a caller's stream whose agent reads slowly
	// holds up to WindowSize in the gateway. Negative leaves the windows
	// to gRPC, which widens them up to 16 MiB by sending probes: that
	// suits long fat links, at two packets more per call on every hop.
	// Give agents the same size (agent.DialOptions).
	WindowSize int
	// CallOptions apply to every call the gateway forwards to an agent.
	// grpc.UseCompressor(gzip.Name) compresses the hop to the agents, the
	// one most likely to cross a slow link: agents of this project
	// decompress gzip and answer in kind, other agents get the calls
	// uncompressed (see the compression extension in PROTOCOL.md). The
	// compressor must be registered in the gateway's program.
	CallOptions []grpc.CallOption
	// Cluster, if set, makes this gateway one replica of several serving
	// one set of agents: it tells Cluster of every tunnel it opens and
	// closes, and a call for an agent this replica holds no tunnel for is
	// forwarded, once, to a replica Cluster says holds one (see Cluster
	// and PeerHeader), through the other replica's peer port (see
	// PeerServerOptions). It applies to RouteByKey, hence to the default
	// routing, fan-out included; ListAgents lists the whole cluster.
	Cluster Cluster
	// ClusterToken is the secret the replicas of one cluster share: a
	// replica sends it in PeerHeader on the calls it forwards, and accepts
	// a call carrying that header only with this token, compared in
	// constant time. Such a call is not authorized again (AuthorizeCall
	// ran on the replica the caller reached) and is never forwarded
	// again. Empty refuses every call that carries the header, so that
	// a gateway that is no replica cannot be made to skip AuthorizeCall.
	ClusterToken string
	// ClusterTokens, if set, replaces ClusterToken with tokens that may
	// change while the gateway runs, so that a cluster can move to a new
	// token without a restart: the first token is sent, and any of them is
	// accepted. To rotate, add the new token after the old one on every
	// replica, then put it first on every replica, then remove the old
	// one. It is called on every forwarded call, so it must be cheap (a
	// value read from an atomic pointer, say). No token refuses every
	// call that carries PeerHeader.
	ClusterTokens func() []string
	// Tunnel configures the handler that accepts the agents' tunnels:
	// limits, keepalive, flow control. Its AffinityKey is set by the
	// gateway; OnReverseTunnelOpen and OnReverseTunnelClose, if set, are
	// still called.
	Tunnel tunnel.TunnelServiceHandlerOptions
}

// Gateway routes gRPC calls to agents connected through reverse tunnels.
// Create one with New, then build the server with its ServerOptions and
// Register.
type Gateway struct {
	keyHeader string
	director  Director
	authorize func(context.Context, string) error
	allowCall func(context.Context, string, []string) error
	drop      []string // headers never forwarded, the key header first
	log       *slog.Logger
	handler   *tunnel.TunnelServiceHandler
	agents    *agentSet
	local     localServices
	forward   grpc.StreamHandler
	health    *health.Server
	metrics   *metrics // nil without a Registerer
	refusals  *refusals
	access    *accessLog // nil without Options.AccessLog
	// cluster and clusterTokens are Options.Cluster and
	// Options.ClusterTokens (or ClusterToken, as a list of one).
	cluster       Cluster
	clusterTokens func() []string
	// maxStreams is the HTTP/2 bound of calls per client connection; 0
	// for none.
	maxStreams uint32
	// maxMsg is the largest message accepted from callers, 0 for gRPC's
	// default.
	maxMsg int
	// window is Options.WindowSize.
	window int
	// peerTurn picks the holder a forwarded call tries first.
	peerTurn atomic.Uint64
	// withdrawn is set by Withdraw: this replica takes no new tunnels
	// and sends new calls to the other replicas where it can.
	withdrawn atomic.Bool
}

// New returns a gateway configured by opts. It fails only if the metrics
// cannot be registered.
func New(opts Options) (*Gateway, error) {
	g := &Gateway{
		keyHeader: strings.ToLower(opts.KeyHeader),
		director:  opts.Director,
		authorize: opts.AuthorizeAgent,
		allowCall: opts.AuthorizeCall,
		log:       opts.Logger,
		health:    health.NewServer(),

		cluster:       opts.Cluster,
		clusterTokens: opts.ClusterTokens,
	}
	if g.keyHeader == "" {
		g.keyHeader = DefaultKeyHeader
	}
	if g.clusterTokens == nil {
		var tokens []string
		if opts.ClusterToken != "" {
			tokens = []string{opts.ClusterToken}
		}
		g.clusterTokens = func() []string { return tokens }
	}
	switch n := opts.MaxStreamsPerConnection; {
	case n == 0:
		g.maxStreams = DefaultMaxStreamsPerConnection
	case n > 0:
		g.maxStreams = uint32(min(n, math.MaxUint32))
	}
	g.maxMsg = max(opts.MaxMessageSize, 0)
	g.window = opts.WindowSize
	// The peer header is for replicas only: never for an agent.
	g.drop = []string{g.keyHeader, PeerHeader}
	for _, h := range opts.DropHeaders {
		g.drop = append(g.drop, strings.ToLower(h))
	}
	if g.director == nil {
		g.director = func(ctx context.Context, call *proxy.Call, g *Gateway) (proxy.Route, error) {
			return g.RouteByKey(ctx, call)
		}
	}
	if g.log == nil {
		g.log = slog.Default()
	}
	if opts.Registerer != nil {
		m, err := newMetrics(opts.Registerer, opts.MaxMetricKeys)
		if err != nil {
			return nil, err
		}
		g.metrics = m
	}
	g.refusals = newRefusals(g.log, g.metrics)
	if opts.AccessLog != nil {
		g.access = &accessLog{log: opts.AccessLog}
	}
	g.agents = newAgentSet()

	hopts := opts.Tunnel
	if g.maxMsg > 0 {
		hopts.TunnelOptions = append(slices.Clip(hopts.TunnelOptions), tunnel.WithMaxRecvMsgSize(g.maxMsg))
	}
	onOpen, onClose := hopts.OnReverseTunnelOpen, hopts.OnReverseTunnelClose
	hopts.AffinityKey = func(t tunnel.TunnelChannel) any { return g.keyOf(t.Context()) }
	hopts.OnReverseTunnelOpen = func(t tunnel.TunnelChannel) {
		g.opened(t)
		if onOpen != nil {
			onOpen(t)
		}
	}
	hopts.OnReverseTunnelClose = func(t tunnel.TunnelChannel) {
		g.closed(t)
		if onClose != nil {
			onClose(t)
		}
	}
	g.handler = tunnel.NewTunnelServiceHandler(hopts)
	g.forward = proxy.Handler(func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		return g.director(ctx, call, g)
	}, proxy.WithCallOptions(opts.CallOptions...), proxy.WithBackendErrors(g.agentFailure))

	g.local = localServices{grpchan.HandlerMap{}}
	healthpb.RegisterHealthServer(g.local, g.health)
	adminpb.RegisterAdminServiceServer(g.local, &adminService{g: g})
	reflection.Register(g.local)
	return g, nil
}

// ServerOptions returns what a *grpc.Server needs to be this gateway: the
// raw codec and unknown-service handler of package proxy (over the tunnel
// frames' own codec), the check of agents' tunnels, the bound of calls per
// connection, the metrics and the access log. Pass them to grpc.NewServer
// together with the server's own options (credentials, through
// Credentials, interceptors, keepalive); interceptors given elsewhere are
// chained, not replaced.
func (g *Gateway) ServerOptions() []grpc.ServerOption {
	opts := []grpc.ServerOption{
		grpc.ForceServerCodecV2(proxy.CodecOver(tunnel.Codec())),
		grpc.UnknownServiceHandler(g.handle),
		grpc.ChainStreamInterceptor(g.vetTunnel),
	}
	opts = append(opts, window.ServerOptions(g.window)...)
	if g.maxStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(g.maxStreams))
	}
	if g.maxMsg > 0 {
		opts = append(opts, grpc.MaxRecvMsgSize(g.maxMsg))
	}
	if g.metrics != nil || g.access != nil {
		opts = append(opts, grpc.StatsHandler(&callStats{m: g.metrics, access: g.access, keyHeader: g.keyHeader}))
	}
	return opts
}

// Register adds the tunnel service that agents open their tunnels on to s.
// Everything else a client calls reaches the gateway's unknown-service
// handler, so that even a service the gateway also offers (health) goes to
// the agent when the call names one.
func (g *Gateway) Register(s grpc.ServiceRegistrar) {
	tunnelpb.RegisterTunnelServiceServer(s, g.handler.Service())
}

// Agent returns a channel to the agents connected with key: calls on it go
// over their tunnels (the least loaded first), which is how code in the gateway's own
// process pushes calls to an agent.
func (g *Gateway) Agent(key string) tunnel.ReverseClientConnInterface {
	return g.handler.KeyAsChannel(key)
}

// Agents returns the agents connected to this gateway, sorted by key, with
// their tunnels; on a replica of a cluster, only this replica's (ListAgents
// asks the others too).
func (g *Gateway) Agents() []*adminpb.Agent {
	return g.agents.list("", g.self())
}

// self is this replica's id, or "" for a gateway alone.
func (g *Gateway) self() string {
	if g.cluster == nil {
		return ""
	}
	return g.cluster.Self()
}

// Shutdown starts draining the gateway: health reports NOT_SERVING, agents
// may not open new tunnels, and each tunnel ends once its calls are done
// (agents then reconnect, to another gateway if there is one). It returns
// at once; grpc.Server.GracefulStop waits for the rest. A replica of a
// cluster calls Withdraw first.
func (g *Gateway) Shutdown() {
	g.Withdraw()
	g.handler.InitiateShutdown()
}

// Serving reports whether the gateway takes new calls and tunnels: true
// until Withdraw or Shutdown.
func (g *Gateway) Serving() bool { return !g.withdrawn.Load() }

// Withdraw is the first step of a replica's drain: health reports
// NOT_SERVING, its tunnels leave the cluster's directory (Cluster.Hold's
// releases), so that the other replicas stop forwarding calls here, it
// refuses new tunnels as a server shutting down does, and it sends new
// calls for agents that other replicas hold there too, while its own
// tunnels still serve the rest. Wait until the other replicas have seen
// the directory change, then call Shutdown: a call forwarded here after
// the tunnels drain could not be served. It is idempotent.
func (g *Gateway) Withdraw() {
	if g.withdrawn.Swap(true) {
		return
	}
	g.health.Shutdown()
	g.agents.releaseAll()
}

// handle serves every call but the agents' tunnels: the gateway's own
// services for a call that names no agent, the director for the rest.
// Replicas forward to each other's peer ports, never here: a call that
// claims to come from one is refused, so that the callers' port is never
// where a stolen or guessed cluster token gets a caller past
// AuthorizeCall.
func (g *Gateway) handle(srv any, ss grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(ss)
	keys := g.keys(ss.Context())
	if len(metadata.ValueFromIncomingContext(ss.Context(), PeerHeader)) > 0 {
		err := Refuse(ReasonBadToken, errNotReplica)
		g.refuseCall(ss.Context(), method, keys, err)
		return refusal(err)
	}
	if g.allowCall != nil {
		if err := g.allowCall(ss.Context(), method, keys); err != nil {
			g.refuseCall(ss.Context(), method, keys, err)
			return refusal(err)
		}
	}
	return g.serve(srv, ss, method, keys)
}

// serve answers a call with the gateway's own services if it names no
// agent and one of them serves its method, and with the director
// otherwise.
func (g *Gateway) serve(srv any, ss grpc.ServerStream, method string, keys []string) error {
	switch {
	case len(keys) == 0:
		if h := g.local.lookup(method); h != nil {
			return h(ss)
		}
	case len(keys) > 1:
		if done, err := g.fanOutLocally(ss, method, keys); done {
			return err
		}
	}
	return g.forward(srv, ss)
}

// PeerServerOptions returns what a *grpc.Server needs to be this replica's
// peer port, where the other replicas of its cluster (Options.Cluster)
// forward the calls of callers they cannot route themselves: the raw codec
// and a handler that accepts only calls carrying the cluster's token in
// PeerHeader, routes them to this replica's own tunnels, and does not
// authorize them again (AuthorizeCall ran on the replica the caller
// reached). Serve it on its own listener, with credentials that admit the
// replicas only (mutual TLS where the gateway has TLS); register nothing
// else on it. Calls are counted and logged by the replica their caller
// reached, so it has no metrics or access log of its own.
func (g *Gateway) PeerServerOptions() []grpc.ServerOption {
	opts := []grpc.ServerOption{
		grpc.ForceServerCodecV2(proxy.CodecOver(tunnel.Codec())),
		grpc.UnknownServiceHandler(g.handlePeer),
	}
	opts = append(opts, window.ServerOptions(g.window)...)
	if g.maxMsg > 0 {
		opts = append(opts, grpc.MaxRecvMsgSize(g.maxMsg))
	}
	return opts
}

// handlePeer serves a call on the peer port: only a replica's, which
// names its agent (or none, to ask this replica for its own agents).
func (g *Gateway) handlePeer(srv any, ss grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(ss)
	keys := g.keys(ss.Context())
	fromPeer, err := g.fromPeer(ss.Context())
	if err == nil && !fromPeer {
		err = Refuse(ReasonBadToken, errPeerPortOnly)
	}
	if err != nil {
		g.refuseCall(ss.Context(), method, keys, err)
		return refusal(err)
	}
	return g.serve(srv, ss, method, keys)
}

// refuseCall logs and counts a call AuthorizeCall refused.
func (g *Gateway) refuseCall(ctx context.Context, method string, keys []string, err error) {
	attrs := append(peerAttrs(ctx),
		slog.String("method", bounded(method, maxLoggedName)),
		slog.String("key", keyField(keys)))
	g.refusals.refuse(whoCaller, reasonOf(whoCaller, err), err, attrs...)
}

// vetTunnel is checkTunnel, whose refusals it logs and counts by reason,
// together with the tunnels the tunnel library refuses for want of room.
func (g *Gateway) vetTunnel(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	switch info.FullMethod {
	case tunnelpb.TunnelService_OpenReverseTunnel_FullMethodName, tunnelpb.TunnelService_OpenTunnel_FullMethodName:
	default:
		return handler(srv, ss)
	}
	if g.withdrawn.Load() {
		// The tunnel library's own refusal while it shuts down: an
		// agent tries again soon, and elsewhere.
		return errShuttingDown
	}
	admitted := false
	err := g.checkTunnel(srv, ss, info, func(srv any, ss grpc.ServerStream) error {
		admitted = true
		if g.cluster != nil {
			// Sent with the tunnel library's own headers: the agent
			// learns which replica holds this tunnel.
			_ = ss.SetHeader(metadata.Pairs(replica.Header, g.cluster.Self()))
		}
		err := handler(srv, ss)
		if tooManyTunnels(err) {
			g.refuseAgent(ss.Context(), ReasonTooManyTunnels, err)
		}
		return err
	})
	if err != nil && !admitted {
		g.refuseAgent(ss.Context(), g.tunnelRefusal(ss.Context(), info.FullMethod, err), err)
	}
	return err
}

// tunnelRefusal is the reason checkTunnel refused a tunnel with err. It
// checks the key again rather than reading err's text: what checkTunnel
// did not refuse for its key, AuthorizeAgent did.
func (g *Gateway) tunnelRefusal(ctx context.Context, method string, err error) RefusalReason {
	if method == tunnelpb.TunnelService_OpenTunnel_FullMethodName {
		return ReasonForwardTunnel
	}
	keys := metadata.ValueFromIncomingContext(ctx, g.keyHeader)
	if len(keys) != 1 || validKey(keys[0]) != nil {
		return ReasonBadKey
	}
	return reasonOf(whoAgent, err)
}

// refuseAgent logs and counts a refused tunnel.
func (g *Gateway) refuseAgent(ctx context.Context, reason RefusalReason, err error) {
	attrs := peerAttrs(ctx)
	if keys := metadata.ValueFromIncomingContext(ctx, g.keyHeader); len(keys) > 0 {
		attrs = append(attrs, slog.String("key", keyField(keys)))
	}
	g.refusals.refuse(whoAgent, reason, err, attrs...)
}

// tooManyTunnels reports whether err is the tunnel library's refusal of a
// tunnel beyond MaxReverseTunnels or MaxReverseTunnelsPerKey. The library
// has no error value to compare with outside its package; its messages
// name the option, which is what this looks for.
func tooManyTunnels(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.ResourceExhausted && strings.Contains(st.Message(), "(see MaxReverseTunnels")
}
