// Package agent makes a gRPC service that sits behind NAT reachable
// through a gateway (see package gateway), without changing the service.
//
// An Agent dials out to the gateway, keeps reverse tunnels open to it
// (opening them again with backoff whenever they fail), and announces its
// key on each. Given the addresses of a gateway cluster's replicas
// (DialGateway, Options.GatewayAddresses), it keeps its tunnels on
// distinct replicas where it can, so that losing one replica never leaves
// it unreachable. Every call the gateway sends through a tunnel is forwarded,
// schema-free, to the local target: messages, metadata, deadlines,
// cancellation and status pass unchanged, so reflection, health and
// streaming calls work as they do when the target is called directly.
//
// Importing the package registers gRPC's gzip compressor, so that a
// gateway may compress the calls it forwards (see the gateway's
// CallOptions); the agent then answers compressed too.
package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	_ "google.golang.org/grpc/encoding/gzip" // a gateway may compress what it forwards
	"google.golang.org/grpc/metadata"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/grpctunnel/grpctunnel/internal/agentkey"
	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/internal/window"
	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// DefaultKeyHeader is the header the key is announced in unless
// Options.KeyHeader says otherwise; it is the gateway's default too.
const DefaultKeyHeader = "tunnel-key"

// IdleTimeout is the idle timeout to dial the gateway with
// (grpc.WithIdleTimeout), as grpctunnel agent does. gRPC retries a
// connection that failed on a schedule of its own, up to two minutes
// apart, and until then fails every call at once, tunnels included; a
// connection that goes idle as soon as no tunnel is open or opening drops
// that schedule, so that each of the agent's attempts dials afresh and the
// agent's own backoff alone (see tunnel.ReconnectOptions) decides when it
// tries again: within a fraction of a second of a restarted gateway
// listening again. An open tunnel is a call in progress, so the connection
// never goes idle while the agent is connected.
const IdleTimeout = 10 * time.Millisecond

// DefaultWindowSize is the HTTP/2 flow-control window of each stream on
// the agent's connections unless DialOptions is given another size; it is
// the gateway's default too (gateway.DefaultWindowSize).
const DefaultWindowSize = window.Default

// DialOptions returns the options to dial both of the agent's connections
// with, the gateway's and the service's, as grpctunnel agent does: HTTP/2
// flow-control windows of windowSize bytes per stream (DefaultWindowSize
// if zero), fixed rather than sized by gRPC's probes, which would cost
// every call two more packets on each connection. A tunnel is one stream,
// so on a link with round trip RTT it carries at most windowSize/RTT
// toward the agent. Negative leaves the windows to gRPC. Use the size the
// gateway uses (gateway.Options.WindowSize); add IdleTimeout for the
// gateway's connection.
func DialOptions(windowSize int) []grpc.DialOption { return window.DialOptions(windowSize) }

// Options configure an Agent.
type Options struct {
	// Key is what callers name to reach this agent through the gateway.
	// Agents that share a key share its calls, each call going to the
	// least loaded of their tunnels.
	Key string
	// KeyHeader is the header the key is announced in (DefaultKeyHeader
	// if empty); it must match the gateway's.
	KeyHeader string
	// Reconnect says how many tunnels to keep (more than one lets calls
	// continue while one reconnects, and spreads a busy agent's calls),
	// how to back off, and which call options (credentials) go with every
	// opening RPC. Its OnStateChange, if set, is called after the agent
	// logs the change. Its Admit, if set, is asked first about every
	// tunnel that opens; the agent's own spreading over gateway replicas
	// decides about the tunnels it admits.
	Reconnect tunnel.ReconnectOptions
	// GatewayAddresses is how many addresses the gateway connection
	// balances its calls over, round-robin, as DialGateway does with
	// several addresses (zero counts as one). The agent keeps its tunnels
	// on distinct gateway replicas where it can, so that losing one replica
	// never leaves it unreachable; the replicas it knows of are those that
	// have taken one of its tunnels, and with more than one address it also
	// expects as many replicas as addresses, before it has seen them. A
	// gateway that names no replica (replica.Header) is not a cluster: its
	// tunnels are kept wherever they land. A tunnel that lands beside
	// another is given back and reopened a few times in a row at most;
	// then it is kept there, and moved later (drained, so that its calls
	// finish) if another replica is still expected: after two seconds
	// (or Reconnect.MaxBackoff if shorter), then twice as long each time,
	// up to sixteen times that.
	GatewayAddresses int
	// MaxMessageSize is the largest message, in bytes, the agent accepts
	// from the gateway and from its service (4 MiB, gRPC's default, if
	// zero). It must match the gateway's for large messages to pass.
	MaxMessageSize int
	// TunnelOptions configure the agent's end of every tunnel: limits,
	// keepalive, flow control.
	TunnelOptions []tunnel.TunnelOption
	// Logger receives a line whenever a tunnel opens, fails or stops, and
	// when the service becomes unreachable or reachable again
	// (slog.Default() if nil).
	Logger *slog.Logger
	// Registerer, if set, receives the agent's Prometheus metrics, labelled
	// with its key: tunnels open, tunnel failures, whether the service is
	// reachable, and calls that failed because it was not.
	Registerer prometheus.Registerer
}

// Agent forwards calls that arrive through reverse tunnels to a local
// target.
type Agent struct {
	reach   *serviceReach
	metrics *metrics // nil without a Registerer

	mu   sync.Mutex
	open map[int]*openTunnel // the tunnels admitted and not ended, by index
	// Spreading over gateway replicas; see spread.go.
	gatewayAddresses int
	spreadBudget     int             // times in a row a tunnel may be given back
	seen             map[string]bool // replicas that may take a tunnel
	refusals         map[int]int     // times each tunnel was given back in a row
	firstRecheck     time.Duration   // the first wait before a later try
	recheckWait      time.Duration   // the next wait; zero to start over
	recheck          *time.Timer     // the later try scheduled, if any
	running          bool            // Run is in progress

	key       string
	keyHeader string
	reconnect tunnel.ReconnectOptions
	log       *slog.Logger
	server    *tunnel.ReverseTunnelServer
}

// New returns an agent that opens its tunnels on gateway (a connection to
// the gateway's address, best dialled with DialOptions and IdleTimeout) and
// forwards every call to target (a connection to the local service, best
// dialled with DialOptions). The agent does not
// close either connection.
func New(gateway, target grpc.ClientConnInterface, opts Options) (*Agent, error) {
	if opts.Key == "" {
		return nil, errors.New("agent: a key is required")
	}
	if problem := agentkey.Problem(opts.Key); problem != "" {
		// The gateway would refuse every tunnel with this key.
		return nil, fmt.Errorf("agent: the key %s %s", errtext.Quote(opts.Key), problem)
	}
	a := &Agent{
		key:              opts.Key,
		keyHeader:        opts.KeyHeader,
		open:             make(map[int]*openTunnel),
		gatewayAddresses: opts.GatewayAddresses,
		spreadBudget:     max(minSpreadBudget, opts.Reconnect.Tunnels),
		seen:             make(map[string]bool),
		refusals:         make(map[int]int),
		firstRecheck:     min(firstSpreadRecheck, cmp.Or(max(opts.Reconnect.MaxBackoff, 0), firstSpreadRecheck)),
		reconnect:        opts.Reconnect,
		log:              opts.Logger,
	}
	if a.keyHeader == "" {
		a.keyHeader = DefaultKeyHeader
	}
	if a.log == nil {
		a.log = slog.Default()
	}
	if opts.Registerer != nil {
		m, err := newMetrics(opts.Registerer, a.key)
		if err != nil {
			return nil, err
		}
		a.metrics = m
	}
	a.reach = newServiceReach(a.key, target, a.log, a.metrics)
	popts := []proxy.Option{proxy.WithBackendErrors(a.reach.rewrite)}
	var limits []tunnel.TunnelOption
	if n := opts.MaxMessageSize; n > 0 {
		popts = append(popts, proxy.WithCallOptions(grpc.MaxCallRecvMsgSize(n)))
		limits = append(limits, tunnel.WithMaxRecvMsgSize(n))
	}
	topts := append([]tunnel.TunnelOption{
		tunnel.WithUnknownServiceHandler(proxy.Handler(func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			return proxy.To(target, md.Copy()), nil
		}, popts...)),
		tunnel.WithCodec(proxy.Codec()),
	}, limits...)
	topts = append(topts, opts.TunnelOptions...)
	a.server = tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(gateway), topts...)
	return a, nil
}

// Run keeps the agent's tunnels open until ctx is done or the agent is
// stopped. It returns nil after GracefulStop or Stop, and ctx's error if
// ctx ended it. An unreachable gateway is not an error: the agent logs it
// and keeps trying, since a gateway may come back.
func (a *Agent) Run(ctx context.Context) error {
	opts := a.reconnect
	report := opts.OnStateChange
	opts.OnStateChange = func(c tunnel.StateChange) {
		a.logState(c)
		a.count(c)
		if report != nil {
			report(c)
		}
	}
	admit := opts.Admit
	opts.Admit = func(c tunnel.StateChange) error {
		if admit != nil {
			if err := admit(c); err != nil {
				return err
			}
		}
		return a.admit(c)
	}
	ctx, cancel := context.WithCancel(ctx)
	waitWatcher := a.reach.run(ctx)
	a.mu.Lock()
	a.running = true
	a.mu.Unlock()
	defer func() {
		a.stopSpreading()
		cancel() // ends the watcher of an unreachable service, if any
		waitWatcher()
	}()
	ctx = metadata.AppendToOutgoingContext(ctx, a.keyHeader, a.key)
	return a.server.ServeWithReconnect(ctx, opts)
}

// count follows which tunnels are open, and on which replicas, for Health
// and the metrics.
func (a *Agent) count(c tunnel.StateChange) {
	var opened, closed bool
	a.mu.Lock()
	switch c.State {
	case tunnel.TunnelOpen:
		t := a.open[c.Tunnel]
		if t == nil { // admitted by admit, always; this is for safety
			t = &openTunnel{replica: replicaOf(c.Header)}
			a.open[c.Tunnel] = t
		}
		opened = !t.reported
		t.reported = true
		t.giveBack = c.GiveBack
	case tunnel.TunnelWaiting, tunnel.TunnelStopped:
		if t := a.open[c.Tunnel]; t != nil {
			closed = t.reported
			delete(a.open, c.Tunnel)
		}
	}
	replicas := len(a.replicasLocked())
	a.mu.Unlock()
	if opened || closed {
		a.metrics.tunnelOpen(opened)
	}
	a.metrics.gatewayReplicas(replicas)
	if c.State == tunnel.TunnelWaiting && c.Err != nil {
		if givenBack(c.Err) {
			a.metrics.tunnelGivenBack()
		} else {
			a.metrics.tunnelFailed()
		}
	}
}

// Health is what an agent can say about itself: whether it can do its job
// of carrying calls from the gateway to its service.
type Health struct {
	// TunnelsOpen is how many of its tunnels to the gateway are open now;
	// with none, no call can reach the agent.
	TunnelsOpen int
	// ServiceReachable is false from a call that failed because the agent
	// could not reach its service until the connection to it is ready
	// again (as Options.Logger is told).
	ServiceReachable bool
	// Replicas are the distinct gateway replicas its open tunnels are on,
	// sorted, as the replicas name themselves (replica.Header); empty for
	// a gateway that is not a cluster. With fewer replicas than open
	// tunnels, losing one replica cuts more than one tunnel, and with one
	// replica, all of them: the agent is then unreachable until they have
	// reopened elsewhere.
	Replicas []string
}

// Health reports the agent's health now, for a health check or a
// readiness probe (grpctunnel agent serves it at /healthz).
func (a *Agent) Health() Health {
	a.mu.Lock()
	n := 0
	for _, t := range a.open {
		if t.reported {
			n++
		}
	}
	replicas := a.replicasLocked()
	a.mu.Unlock()
	return Health{TunnelsOpen: n, ServiceReachable: a.reach.reachable(), Replicas: replicas}
}

func (a *Agent) logState(c tunnel.StateChange) {
	switch c.State {
	case tunnel.TunnelOpen:
		if id := replicaOf(c.Header); id != "" {
			a.log.Info("tunnel open", "tunnel", c.Tunnel, "key", a.key, "replica", id)
		} else {
			a.log.Info("tunnel open", "tunnel", c.Tunnel, "key", a.key)
		}
	case tunnel.TunnelWaiting:
		switch {
		case givenBack(c.Err):
			a.log.Info("tunnel given back to spread over gateway replicas; reopening", "tunnel", c.Tunnel, "key", a.key, "reason", c.Err, "retry_in", c.Delay.Round(time.Millisecond).String())
		case c.Err != nil:
			a.log.Warn("tunnel failed; retrying", "tunnel", c.Tunnel, "key", a.key, "err", c.Err, "retry_in", c.Delay.Round(time.Millisecond).String())
		default:
			a.log.Info("tunnel closed by the gateway; reopening", "tunnel", c.Tunnel, "key", a.key, "retry_in", c.Delay.Round(time.Millisecond).String())
		}
	case tunnel.TunnelStopped:
		a.log.Info("tunnel stopped", "tunnel", c.Tunnel, "key", a.key)
	}
}

// ServiceUnreachable reports how many calls failed because the agent could
// not reach its service (its connection to the target was down); callers
// got Unavailable saying so, and the agent's log has the cause.
func (a *Agent) ServiceUnreachable() uint64 { return a.reach.failures.Load() }

// GracefulStop stops opening tunnels, lets the calls in progress finish,
// and then closes the tunnels; Run returns after that.
func (a *Agent) GracefulStop() { a.server.GracefulStop() }

// Stop closes the tunnels at once; calls in progress fail with
// Unavailable.
func (a *Agent) Stop() { a.server.Stop() }
