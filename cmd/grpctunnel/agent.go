package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/internal/agentkey"
	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// agentConfig is the agent's command line.
type agentConfig struct {
	gateway       string
	key           string
	target        string
	tls           bool
	ca            string
	tlsCert       string
	tlsKey        string
	serverName    string
	tokenFile     string
	insecureToken bool
	targetTLS     bool
	tunnels       int
	maxMsgSize    int
	windowSize    int
	metrics       string
	keyHeader     string
	drainTimeout  time.Duration
	maxBackoff    time.Duration
	keepalive     keepaliveFlags
	// reload is what SIGHUP reloads; startAgent registers the files with
	// it. nil, as in the demo, for none.
	reload *reloader
}

// defaultMaxBackoff is tunnel.ReconnectOptions' own default.
const defaultMaxBackoff = 30 * time.Second

// gatewayTLS reports whether the agent dials the gateway with TLS: asked
// for, or implied by a flag that only makes sense with it.
func (c *agentConfig) gatewayTLS() bool {
	return c.tls || c.ca != "" || c.tlsCert != ""
}

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg agentConfig
	c := newCLI("agent", "grpctunnel agent --gateway ADDR --key KEY --target ADDR [flags]",
		"Dials the gateway, keeps reverse tunnels open to it under KEY (reopening them\n"+
			"with backoff whenever they fail) and forwards every call that arrives\n"+
			"through them to the gRPC service at --target.",
		stdout, stderr)
	fs := c.fs
	cfg.addFlags(fs)
	logs := addLogFlags(fs, slog.LevelInfo)
	if code, ok := c.parse(args); !ok {
		return code
	}
	if code, ok := c.requireFlags("gateway", "key", "target"); !ok {
		return code
	}
	switch {
	case (cfg.tlsCert == "") != (cfg.tlsKey == ""):
		return c.fail("--tls-cert and --tls-key go together")
	case cfg.serverName != "" && !cfg.gatewayTLS():
		return c.fail("--server-name needs TLS: give --tls or --ca")
	case cfg.tokenFile != "" && !cfg.gatewayTLS() && !cfg.insecureToken:
		return c.fail("--token-file needs TLS (--tls or --ca): a token sent in plaintext can be read and reused by anyone on the path; --insecure-token sends it anyway")
	case agentkey.Problem(cfg.key) != "":
		return c.fail("--key %s %s: the gateway accepts no such key", errtext.Quote(cfg.key), agentkey.Problem(cfg.key))
	case gatewayProblem(cfg.gateway) != "":
		return c.fail("%s", gatewayProblem(cfg.gateway))
	case missingPort(cfg.target):
		return c.fail("--target %s has no port: give host:port", errtext.Quote(cfg.target))
	case cfg.tunnels < 1:
		return c.fail("--tunnels must be at least 1")
	case cfg.drainTimeout <= 0:
		return c.fail("--drain-timeout must be positive")
	case cfg.maxBackoff <= 0:
		return c.fail("--max-backoff must be positive")
	case cfg.windowSize < 0:
		return c.fail("--window-size must not be negative")
	}
	if msg := cfg.keepalive.check(); msg != "" {
		return c.fail("%s", msg)
	}
	log := logs.logger(stderr)

	// SIGHUP is taken before the agent starts, so that one sent as soon
	// as it logs "agent starting" finds it handled rather than ending it.
	cfg.reload = &reloader{log: log}
	stopReload := cfg.reload.watch()
	defer stopReload()
	a, err := startAgent(cfg, log)
	if err != nil {
		log.Error("agent failed to start", "err", err)
		return 1
	}
	select {
	case <-ctx.Done():
		log.Info("stopping: finishing calls in progress", "timeout", cfg.drainTimeout.String())
	case err := <-a.done:
		// Run ends only when stopped, and nothing has stopped it.
		log.Error("agent stopped unexpectedly", "err", err)
		a.close()
		return 1
	}
	if !a.stop(ctx, cfg.drainTimeout) {
		log.Warn("drain cut short: closed the calls still in progress")
	}
	log.Info("stopped")
	return 0
}

// runningAgent is an agent whose Run is in progress, with its connections.
type runningAgent struct {
	a       *agent.Agent
	gateway *grpc.ClientConn
	target  *grpc.ClientConn
	done    chan error // Run's result, or why the metrics server stopped
	ops     *opsServer // nil without --metrics
	// cancel ends Run's context: only close uses it, since a signal
	// should drain the agent, not cut its tunnels.
	cancel context.CancelFunc
}

// startAgent dials the gateway and the target and starts the agent.
func startAgent(cfg agentConfig, log *slog.Logger) (*runningAgent, error) {
	reload := cfg.reload
	if reload == nil {
		reload = &reloader{log: log}
	}
	gwCreds := insecure.NewCredentials()
	if cfg.gatewayTLS() {
		load := func() (*tls.Config, error) { return clientTLS(cfg.ca, cfg.tlsCert, cfg.tlsKey, cfg.serverName) }
		tlsCfg, err := load()
		if err != nil {
			return nil, err
		}
		current := newReloadable(tlsCfg)
		// Only files can change: with --tls alone (the system's CAs, no
		// client certificate) a reload has nothing of its own to read.
		if cfg.ca != "" || cfg.tlsCert != "" {
			addReloadable(reload, "tls", current, load, func(c *tls.Config) []any { return describeTLS(c, "client_cert") })
		}
		gwCreds = reloadingTLS{current}
	}
	var callOpts []grpc.CallOption
	if cfg.tokenFile != "" {
		load := func() (*string, error) {
			token, err := readAgentToken(cfg.tokenFile)
			return &token, err
		}
		token, err := load()
		if err != nil {
			return nil, err
		}
		current := newReloadable(token)
		// The token itself is a secret: the log says only that it was read.
		addReloadable(reload, "token", current, load, func(*string) []any { return []any{"token_file", cfg.tokenFile} })
		callOpts = append(callOpts, grpc.PerRPCCredentials(reloadingBearer{token: current, insecure: cfg.insecureToken}))
	}
	targetCreds := insecure.NewCredentials()
	if cfg.targetTLS {
		targetCreds = credentials.NewTLS(nil)
	}

	gateways, problem := gatewayAddrs(cfg.gateway)
	if problem != "" {
		return nil, errors.New(problem)
	}
	// DialGateway balances the tunnels round-robin over the gateway's
	// addresses, and sets the idle timeout that lets the agent's backoff
	// alone pace its attempts (see agent.IdleTimeout).
	dialOpts := agent.DialOptions(windowSizeOption(cfg.windowSize))
	gwConn, err := agent.DialGateway(gateways, slices.Concat(dialOpts, []grpc.DialOption{grpc.WithTransportCredentials(gwCreds),
		grpc.WithKeepaliveParams(cfg.keepalive.clientParams())})...)
	if err != nil {
		return nil, fmt.Errorf("gateway address: %w", err)
	}
	targetConn, err := grpc.NewClient(cfg.target, append(slices.Clip(dialOpts), grpc.WithTransportCredentials(targetCreds))...)
	if err != nil {
		gwConn.Close()
		return nil, fmt.Errorf("target address: %w", err)
	}
	reach := &reachability{log: log, gateway: cfg.gateway, tls: cfg.gatewayTLS()}
	var reg *prometheus.Registry
	if cfg.metrics != "" {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	a, err := agent.New(gwConn, targetConn, agent.Options{
		Key:              cfg.key,
		KeyHeader:        cfg.keyHeader,
		GatewayAddresses: len(gateways),
		Reconnect: tunnel.ReconnectOptions{
			Tunnels:       cfg.tunnels,
			MaxBackoff:    cfg.maxBackoff,
			CallOptions:   callOpts,
			OnStateChange: reach.changed,
		},
		TunnelOptions:  []tunnel.TunnelOption{cfg.keepalive.tunnelOption()},
		MaxMessageSize: cfg.maxMsgSize,
		Logger:         log,
		Registerer:     registerer(reg),
	})
	if err != nil {
		gwConn.Close()
		targetConn.Close()
		return nil, err
	}
	log.Info("agent starting", "gateway", cfg.gateway, "gateways", gateways, "key", cfg.key, "target", cfg.target, "tunnels", cfg.tunnels,
		"tls", cfg.gatewayTLS(), "client_cert", cfg.tlsCert != "", "token", cfg.tokenFile != "")
	r := &runningAgent{a: a, gateway: gwConn, target: targetConn, done: make(chan error, 1)}
	if reg != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { writeHealth(w, a.Health()) })
		if r.ops, err = startOpsServer(cfg.metrics, mux, "metrics", log, r.done); err != nil {
			gwConn.Close()
			targetConn.Close()
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- a.Run(ctx) }()
	return r, nil
}

// stop lets calls in progress finish, for at most drain or until a second
// signal, then closes the tunnels and the connections. It reports whether
// the calls finished in time.
func (r *runningAgent) stop(ctx context.Context, drain time.Duration) bool {
	graceful := waitBounded(ctx, drain, r.a.GracefulStop, r.a.Stop)
	r.close()
	return graceful
}

// close stops the agent at once and closes its connections.
func (r *runningAgent) close() {
	r.cancel()
	r.a.Stop()
	<-r.done
	r.gateway.Close()
	r.target.Close()
	if r.ops != nil {
		r.ops.shutdown()
	}
}

// registerer is reg as an agent.Options.Registerer: nil, not a typed nil,
// without --metrics.
func registerer(reg *prometheus.Registry) prometheus.Registerer {
	if reg == nil {
		return nil
	}
	return reg
}

// writeHealth answers /healthz from h: 200 when the agent can carry calls,
// 503 with what stops it otherwise, so that a probe's log says why.
func writeHealth(w http.ResponseWriter, h agent.Health) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch {
	case h.TunnelsOpen == 0:
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "no tunnel open to the gateway")
	case !h.ServiceReachable:
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "the service is unreachable")
	case len(h.Replicas) > 0:
		fmt.Fprintf(w, "ok: %d tunnels open, on gateway replicas %s, the service reachable\n", h.TunnelsOpen, strings.Join(h.Replicas, ", "))
	default:
		fmt.Fprintf(w, "ok: %d tunnels open, the service reachable\n", h.TunnelsOpen)
	}
}

// gatewayAddrs splits --gateway into the addresses the agent balances its
// tunnels over: one gRPC target, passed on as given (DNS resolves a
// host:port, and the tunnels go round-robin over all it resolves to), or a
// comma-separated list of host:port, one for each replica of a gateway
// cluster. problem says what is wrong with the flag, naming the address at
// fault, as the command line's error.
func gatewayAddrs(flagValue string) (addrs []string, problem string) {
	parts := strings.Split(flagValue, ",")
	if len(parts) == 1 {
		if missingPort(flagValue) {
			return nil, fmt.Sprintf("--gateway %s has no port: give host:port", errtext.Quote(flagValue))
		}
		return []string{flagValue}, ""
	}
	for i, p := range parts {
		a := strings.TrimSpace(p)
		switch {
		case a == "":
			return nil, fmt.Sprintf("--gateway %s: address %d of %d is empty", errtext.Quote(flagValue), i+1, len(parts))
		case strings.Contains(a, ":/") || strings.HasPrefix(a, "unix:"):
			return nil, fmt.Sprintf("--gateway %s: %s is a gRPC target; a list takes host:port addresses only", errtext.Quote(flagValue), errtext.Quote(a))
		case missingPort(a):
			return nil, fmt.Sprintf("--gateway %s: %s has no port: give host:port for every address", errtext.Quote(flagValue), errtext.Quote(a))
		case slices.Contains(addrs, a):
			return nil, fmt.Sprintf("--gateway %s: %s is listed twice", errtext.Quote(flagValue), errtext.Quote(a))
		}
		addrs = append(addrs, a)
	}
	return addrs, ""
}

// gatewayProblem is what is wrong with --gateway, if anything.
func gatewayProblem(flagValue string) string {
	_, problem := gatewayAddrs(flagValue)
	return problem
}

// missingPort reports whether addr, a host:port unless it is a gRPC target
// with a scheme (dns:///host:port, unix:path ...), lacks its port: gRPC
// would quietly dial port 443, which is rarely what was meant.
func missingPort(addr string) bool {
	if strings.Contains(addr, ":/") || strings.HasPrefix(addr, "unix:") {
		return false
	}
	_, port, err := net.SplitHostPort(addr)
	return err != nil || port == ""
}

// reachability turns the agent's tunnel states into a clear account of
// whether the gateway can be reached: the agent logs every failure as a
// warning and retries, but an operator needs to see the first failure of a
// streak, and its cause, as an error, and again whenever a later attempt
// tells more (a TLS alert that arrives after a failed write, say).
type reachability struct {
	log     *slog.Logger
	gateway string
	tls     bool // the agent dials the gateway with TLS

	mu     sync.Mutex
	logged map[string]bool // explanations logged as errors since the last tunnel opened
}

func (r *reachability) changed(c tunnel.StateChange) {
	switch {
	case c.State == tunnel.TunnelOpen:
		r.mu.Lock()
		recovered := r.logged != nil
		r.logged = nil
		r.mu.Unlock()
		if recovered {
			r.log.Info("reached the gateway at " + r.gateway)
		}
	case c.State == tunnel.TunnelWaiting && errors.Is(c.Err, tunnel.ErrGivenBack):
		// The agent's own choice, to move the tunnel to another replica:
		// the gateway was reached, and the agent logs why.
	case c.State == tunnel.TunnelWaiting && c.Err != nil:
		why := r.explain(c.Err)
		r.mu.Lock()
		news := !r.logged[why]
		if news {
			if r.logged == nil {
				r.logged = make(map[string]bool)
			}
			r.logged[why] = true
		}
		r.mu.Unlock()
		if news {
			r.log.Error(why+"; retrying, later failures are logged as warnings", "err", c.Err)
		}
	}
}

// explain tells a gateway that cannot be reached from one that refuses the
// agent, and a TLS mistake on either side from both, since each needs a
// different fix. The TLS cases can only be told from gRPC's message.
func (r *reachability) explain(err error) string {
	gw := "the gateway at " + r.gateway
	msg := status.Convert(err).Message()
	closed := strings.Contains(msg, "error reading server preface: EOF") ||
		strings.Contains(msg, "broken pipe") || strings.Contains(msg, "connection reset")
	switch code := status.Code(err); {
	case code == codes.Unauthenticated || code == codes.PermissionDenied:
		return gw + " does not admit this agent (check --token-file, the client certificate and --key)"
	case code == codes.InvalidArgument || code == codes.Unimplemented || code == codes.ResourceExhausted:
		return gw + " refused the agent's tunnel"
	case code != codes.Unavailable:
	case strings.Contains(msg, "shutting down"):
		return gw + " is shutting down"
	case strings.Contains(msg, "first record does not look like a TLS handshake"):
		return gw + " does not speak TLS (drop --tls and --ca, or serve the gateway with --tls-cert)"
	case strings.Contains(msg, "x509:") || strings.Contains(msg, "failed to verify certificate"):
		return "the agent does not trust the certificate of " + gw + " (check --ca and --server-name)"
	case strings.Contains(msg, "remote error: tls:"):
		return gw + " rejected the agent's certificate (check --tls-cert and that the gateway's --client-ca issued it)"
	case closed && !r.tls:
		return gw + " closed the connection at once: it may expect TLS, which the agent speaks with --tls or --ca"
	case closed:
		return gw + " closed the connection after the TLS handshake: it may have rejected the agent's certificate (check --tls-cert and the gateway's --client-ca)"
	}
	return "cannot reach " + gw
}

// addFlags defines the agent's flags on fs, each with cfg's field as its
// destination and the command's default, which it sets. The demo takes its
// configuration from here too (see defaultAgentConfig), so that it runs with
// what the command runs with.
func (cfg *agentConfig) addFlags(fs *flag.FlagSet) {
	fs.StringVar(&cfg.gateway, "gateway", "", "the gateway's `addr`ess host:port, or the addresses of a gateway cluster's\nreplicas, comma-separated: the tunnels go round-robin over them, each on\nanother replica where it can (required)")
	fs.StringVar(&cfg.key, "key", "", "the agent `key` callers name in the key header to reach this agent (required)")
	fs.StringVar(&cfg.target, "target", "", "the local gRPC service's `addr`ess, host:port (required)")
	fs.BoolVar(&cfg.tls, "tls", false, "dial the gateway with TLS, trusting the system's CAs (implied by --ca and --tls-cert)")
	fs.StringVar(&cfg.ca, "ca", "", "trust only the CAs in this PEM `file` for the gateway's certificate")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "present the PEM client certificate in `file` to the gateway (mutual TLS); needs --tls-key")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "PEM private key `file` of --tls-cert")
	fs.StringVar(&cfg.serverName, "server-name", "", "expect the gateway's certificate to be for `name` rather than the host of --gateway")
	fs.StringVar(&cfg.tokenFile, "token-file", "", "send the token in `file` (its first line that is not blank or a # comment)\nas authorization: Bearer on every tunnel; needs TLS")
	fs.BoolVar(&cfg.insecureToken, "insecure-token", false, "send --token-file's token even without TLS, where anyone on the path can read it")
	fs.BoolVar(&cfg.targetTLS, "target-tls", false, "dial the target with TLS, trusting the system's CAs (plaintext otherwise)")
	fs.IntVar(&cfg.maxMsgSize, "max-msg-size", defaultMaxMsgSize, "accept messages of up to `bytes` from the gateway and the target; the\ngateway needs the same --max-msg-size for requests that large")
	fs.IntVar(&cfg.windowSize, "window-size", agent.DefaultWindowSize, windowSizeUsage)
	fs.StringVar(&cfg.metrics, "metrics", "", "serve Prometheus metrics at http://`addr`ess/metrics, and /healthz: 200 while\na tunnel is open and the service reachable, 503 saying why otherwise")
	fs.IntVar(&cfg.tunnels, "tunnels", 1, "keep `n` tunnels open over the agent's connection; one carries 1,000\ncalls at once, more spread a very busy agent's calls over more readers")
	fs.StringVar(&cfg.keyHeader, "key-header", agent.DefaultKeyHeader, "`header` the key is announced in; must match the gateway's")
	fs.DurationVar(&cfg.drainTimeout, "drain-timeout", defaultDrainTimeout, "on SIGINT or SIGTERM, wait up to `duration` for calls in progress before closing them")
	fs.DurationVar(&cfg.maxBackoff, "max-backoff", defaultMaxBackoff, "wait at most `duration` between attempts to reach the gateway (the wait\nstarts at 100ms, doubles with each failure and is drawn at random below\nthat); a gateway that drains or restarts is tried again within 400ms")
	cfg.keepalive.add(fs,
		"ping the gateway when a tunnel has been silent for `duration`, and the\nconnection under it too (every 10s at most)",
		"give the gateway up when a ping has had no answer for `duration`: the\ntunnel, or the connection, closes and the agent reconnects")
}

// defaultAgentConfig is the configuration of the agent when no flag is given.
func defaultAgentConfig() agentConfig {
	var cfg agentConfig
	cfg.addFlags(flag.NewFlagSet("defaults", flag.ContinueOnError))
	return cfg
}
