package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// Keepalive, on both ends of an agent's connection and with the same
// numbers by default, so that either end notices a silent peer (a hung
// process, a path that drops everything) within 30 seconds. The tunnel's
// own keepalive pings a tunnel silent for the interval and gives it up,
// failing its calls, after the timeout more; gRPC's, on the connection
// under it, does the same with HTTP/2 pings, which any gRPC peer answers,
// and closing the connection is what finally releases the gateway's
// handler of a tunnel given up that way. --keepalive-interval and
// --keepalive-timeout set both.
const (
	defaultKeepaliveInterval = 20 * time.Second
	defaultKeepaliveTimeout  = 10 * time.Second
)

// gRPC clients ping no more often than every 10 seconds, whatever they are
// asked, and servers ping no more often than every second. The gateway
// accepts a ping every 10 seconds, from agents and callers alike, even
// without calls in progress: gRPC disconnects a client that pings more
// often than its server allows.
const (
	minClientPingInterval = 10 * time.Second
	minServerPingInterval = time.Second
)

var gatewayPingLimit = keepalive.EnforcementPolicy{MinTime: minClientPingInterval, PermitWithoutStream: true}

// defaultDrainTimeout bounds how long a stop waits for calls in progress.
const defaultDrainTimeout = 30 * time.Second

// defaultMaxMsgSize is gRPC's own default limit on a received message.
const defaultMaxMsgSize = 4 << 20

// gatewayConfig is the gateway's command line.
type gatewayConfig struct {
	listen       string
	tlsCert      string
	tlsKey       string
	clientCA     string
	tokenFile    string
	keyFromCert  bool
	callerTokens string
	metrics      string
	keyHeader    string
	drainTimeout time.Duration
	compress     bool
	keepalive    keepaliveFlags
	maxMsgSize   int
	maxStreams   int
	windowSize   int
	accessLog    bool
	cluster      clusterFlags
	// reload is what SIGHUP reloads; startGateway registers the files
	// with it. nil, as in the demo, for none.
	reload *reloader
}

func runGateway(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg gatewayConfig
	c := newCLI("gateway", "grpctunnel gateway --listen ADDR [flags]",
		"Accepts reverse tunnels from agents and routes gRPC calls to them: a caller\n"+
			"names the agent in the key header, and the call goes through that agent's\n"+
			"tunnel to the service beside it. Calls without the header reach the\n"+
			"gateway's own health, reflection and grpctunnel.admin.v1.AdminService.\n\n"+
			"With --etcd it is one replica of a cluster: agents and callers may reach\n"+
			"any replica, and a call for an agent held by another replica crosses to\n"+
			"it, once, on that replica's --peer-listen port.",
		stdout, stderr)
	fs := c.fs
	cfg.addFlags(fs)
	logs := addLogFlags(fs, slog.LevelInfo)
	if code, ok := c.parse(args); !ok {
		return code
	}
	if code, ok := c.requireFlags("listen"); !ok {
		return code
	}
	switch {
	case (cfg.tlsCert == "") != (cfg.tlsKey == ""):
		return c.fail("--tls-cert and --tls-key go together")
	case cfg.clientCA != "" && cfg.tlsCert == "":
		return c.fail("--client-ca needs TLS: give --tls-cert and --tls-key too")
	case cfg.keyFromCert && cfg.clientCA == "":
		return c.fail("--agent-key-from-cert needs client certificates: give --client-ca too")
	case cfg.drainTimeout <= 0:
		return c.fail("--drain-timeout must be positive")
	case cfg.windowSize < 0:
		return c.fail("--window-size must not be negative")
	}
	if msg := cfg.keepalive.check(); msg != "" {
		return c.fail("%s", msg)
	}
	if msg := cfg.cluster.check(cfg.tlsCert != "", cfg.clientCA); msg != "" {
		return c.fail("%s", msg)
	}
	log := logs.logger(stderr)

	// SIGHUP is taken before the gateway starts, so that one sent as soon
	// as it logs "listening" finds it handled rather than ending it.
	cfg.reload = &reloader{log: log}
	stopReload := cfg.reload.watch()
	defer stopReload()
	gw, err := startGateway(cfg, log)
	if err != nil {
		log.Error("gateway failed to start", "err", err)
		return 1
	}
	select {
	case <-ctx.Done():
		log.Info("stopping: draining agents' tunnels and calls", "timeout", cfg.drainTimeout.String())
	case err := <-gw.failed:
		log.Error("gateway failed", "err", err)
		gw.stop(ctx, 0)
		return 1
	}
	gw.stop(ctx, cfg.drainTimeout)
	log.Info("stopped")
	return 0
}

// gatewayServer is a gateway serving on its listener, with its metrics
// server if it has one.
type gatewayServer struct {
	g       *gateway.Gateway
	srv     *grpc.Server
	addr    net.Addr
	metrics *opsServer // nil without --metrics
	replica *replica   // nil without --etcd
	log     *slog.Logger
	failed  chan error    // a server that stopped on its own
	done    chan struct{} // closed when the gRPC server has returned
}

// startGateway builds the gateway from cfg, binds its listeners and starts
// serving. It logs "listening" with the bound address, which is how a
// caller of --listen host:0 learns the port.
func startGateway(cfg gatewayConfig, log *slog.Logger) (*gatewayServer, error) {
	var opts gateway.Options
	opts.KeyHeader = cfg.keyHeader
	opts.Logger = log
	if cfg.accessLog {
		// An operator who asks for the access log wants it whatever
		// --log-level keeps of the rest; it shares the handler, and so
		// the format and the writes, of the other lines.
		opts.AccessLog = slog.New(infoFloor{log.Handler()})
	}
	opts.MaxMessageSize = cfg.maxMsgSize
	opts.MaxStreamsPerConnection = cfg.maxStreams
	if cfg.maxStreams == 0 {
		opts.MaxStreamsPerConnection = -1 // the flag's 0 is no bound
	}
	opts.WindowSize = windowSizeOption(cfg.windowSize)
	opts.Tunnel.TunnelOptions = []tunnel.TunnelOption{cfg.keepalive.tunnelOption()}
	if cfg.compress {
		opts.CallOptions = []grpc.CallOption{grpc.UseCompressor(gzip.Name)}
	}
	reload := cfg.reload
	if reload == nil {
		reload = &reloader{log: log}
	}
	var admit []func(context.Context, string) error
	if cfg.tokenFile != "" {
		tokens, err := reloadableTokens(reload, "tokens", cfg.tokenFile)
		if err != nil {
			return nil, err
		}
		admit = append(admit, func(ctx context.Context, key string) error { return tokens.load().authorize(ctx, key) })
	}
	if cfg.keyFromCert {
		admit = append(admit, certificateNamesKey)
	}
	if len(admit) > 0 {
		opts.AuthorizeAgent = func(ctx context.Context, key string) error {
			for _, check := range admit {
				if err := check(ctx, key); err != nil {
					return err
				}
			}
			return nil
		}
	}
	if cfg.callerTokens != "" {
		tokens, err := reloadableTokens(reload, "caller_tokens", cfg.callerTokens)
		if err != nil {
			return nil, err
		}
		opts.AuthorizeCall = func(ctx context.Context, method string, keys []string) error {
			return tokens.load().authorizeCall(ctx, method, keys)
		}
		opts.DropHeaders = []string{callerTokenHeader}
	}
	var reg *prometheus.Registry
	if cfg.metrics != "" {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		opts.Registerer = reg
	}
	var tlsCfg *tls.Config
	loadTLS := func() (*tls.Config, error) { return serverTLS(cfg.tlsCert, cfg.tlsKey, cfg.clientCA) }
	if cfg.tlsCert != "" {
		var err error
		if tlsCfg, err = loadTLS(); err != nil {
			return nil, err
		}
	}
	var member *replica
	if cfg.cluster.etcd != "" {
		var err error
		var clusterTLS func() (*tls.Config, error)
		if tlsCfg != nil {
			clusterTLS = loadTLS
		}
		if member, err = joinCluster(cfg.cluster, clusterTLS, cfg.clientCA, opts.WindowSize, reload, log); err != nil {
			return nil, err
		}
		opts.Cluster = member.peering
		opts.ClusterTokens = member.clusterTokens
		if reg != nil {
			member.register(reg)
		}
	}
	g, err := gateway.New(opts)
	if err != nil {
		if member != nil {
			member.stop(context.Background(), 0)
		}
		return nil, err
	}

	serverOpts := append(g.ServerOptions(), grpc.KeepaliveParams(cfg.keepalive.serverParams()), grpc.KeepaliveEnforcementPolicy(gatewayPingLimit))
	if tlsCfg != nil {
		current := newReloadable(tlsCfg)
		addReloadable(reload, "tls", current, loadTLS, func(c *tls.Config) []any { return describeTLS(c, "cert") })
		// Through the gateway's wrapper, so that the handshakes it
		// refuses are logged and counted rather than dropped unseen.
		serverOpts = append(serverOpts, grpc.Creds(g.Credentials(reloadingTLS{current})))
	}
	srv := grpc.NewServer(serverOpts...)
	g.Register(srv)

	lis, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		if member != nil {
			member.stop(context.Background(), 0)
		}
		return nil, err
	}
	s := &gatewayServer{g: g, srv: srv, addr: lis.Addr(), log: log, replica: member, failed: make(chan error, 3), done: make(chan struct{})}
	if cfg.metrics != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", s.writeHealth)
		mux.Handle("/", g.DashboardHandler())
		if s.metrics, err = startOpsServer(cfg.metrics, mux, "metrics", log, s.failed); err != nil {
			lis.Close()
			if member != nil {
				member.stop(context.Background(), 0)
			}
			return nil, err
		}
	}
	if member != nil {
		member.serve(g, s.failed)
	}
	go func() {
		defer close(s.done)
		if err := srv.Serve(lis); err != nil {
			s.failed <- err
		}
	}()
	log.Info("listening", "addr", lis.Addr().String(), "tls", cfg.tlsCert != "", "client_certs", cfg.clientCA != "", "tokens", cfg.tokenFile != "", "caller_tokens", cfg.callerTokens != "", "agent_key_from_cert", cfg.keyFromCert, "access_log", cfg.accessLog)
	if cfg.tlsCert == "" {
		log.Warn("serving without TLS: agents' tokens and every call travel in plaintext; give --tls-cert and --tls-key unless a TLS proxy stands in front")
	}
	return s, nil
}

// stop drains the gateway: health turns NOT_SERVING, agents may open no new
// tunnels, and the server waits for calls in progress, for at most drain or
// until a second signal, before it closes what is left. A drain of 0 closes
// everything at once.
//
// A replica of a cluster first withdraws its tunnels from the directory
// and waits, for at most a fifth of drain, until its own copy of the
// directory shows them gone, which the other replicas' copies show at
// about the same moment: from then on they forward nothing here, and this
// replica sends the new calls it gets to them. Only then do its tunnels
// drain (their agents open them again on other replicas) and its servers
// stop; last, it revokes its lease.
func (s *gatewayServer) stop(ctx context.Context, drain time.Duration) {
	deadline := time.Now().Add(drain)
	if s.replica != nil && drain > 0 {
		s.g.Withdraw()
		s.replica.awaitWithdrawn(ctx, drain/5)
		s.log.Info("withdrew this replica's tunnels from the cluster's directory; draining them")
	}
	s.g.Shutdown()
	if !waitBounded(ctx, time.Until(deadline), s.srv.GracefulStop, s.srv.Stop) {
		s.log.Warn("drain cut short: closed the calls still in progress")
	}
	if s.replica != nil {
		s.replica.stop(ctx, max(time.Until(deadline), 0))
	}
	if s.metrics != nil {
		s.metrics.shutdown()
	}
	<-s.done
}

// writeHealth answers /healthz: 200 while the gateway serves, 503 once it
// drains, with the cluster's state for a replica (etcd reachable or not:
// a replica keeps serving with its last directory when it is not).
func (s *gatewayServer) writeHealth(w http.ResponseWriter, r *http.Request) {
	body := map[string]any{"serving": s.g.Serving()}
	if s.replica != nil {
		body["cluster"] = s.replica.health()
	}
	w.Header().Set("Content-Type", "application/json")
	if !s.g.Serving() {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(body)
}

// waitBounded runs graceful and waits for it, for at most timeout or until
// a second signal (see forced); then it runs hard, which must make graceful
// return, and waits for graceful still. It reports whether graceful was
// enough.
func waitBounded(ctx context.Context, timeout time.Duration, graceful, hard func()) bool {
	done := make(chan struct{})
	go func() {
		defer close(done)
		graceful()
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-done:
		return true
	case <-timer.C:
	case <-forced(ctx):
	}
	hard()
	<-done
	return false
}

// reloadableTokens loads a gateway token file and registers it with
// reload under name, the attribute that counts its tokens in the log.
func reloadableTokens(reload *reloader, name, file string) (*reloadable[tokenSet], error) {
	load := func() (*tokenSet, error) { return loadTokens(file) }
	tokens, err := load()
	if err != nil {
		return nil, err
	}
	current := newReloadable(tokens)
	addReloadable(reload, name, current, load, func(s *tokenSet) []any { return s.describe(name) })
	return current, nil
}

// certificateNamesKey is gateway.CertificateNamesKey with its refusals
// marked by reason, for the gateway's log and refusal metric.
func certificateNamesKey(ctx context.Context, key string) error {
	err := gateway.CertificateNamesKey(ctx, key)
	switch status.Code(err) {
	case codes.OK:
		return nil
	case codes.Unauthenticated:
		return gateway.Refuse(gateway.ReasonNoCertificate, err)
	}
	return gateway.Refuse(gateway.ReasonKeyNotAllowed, err)
}

// infoFloor is a log handler that takes info lines and above whatever the
// level of the handler it writes to, for the access log.
type infoFloor struct{ slog.Handler }

func (h infoFloor) Enabled(_ context.Context, level slog.Level) bool { return level >= slog.LevelInfo }

func (h infoFloor) WithAttrs(attrs []slog.Attr) slog.Handler {
	return infoFloor{h.Handler.WithAttrs(attrs)}
}

func (h infoFloor) WithGroup(name string) slog.Handler { return infoFloor{h.Handler.WithGroup(name)} }

// addFlags defines the gateway's flags on fs, each with cfg's field as its
// destination and the command's default, which it sets. The demo takes its
// configuration from here too (see defaultGatewayConfig), so that it runs with
// what the command runs with.
func (cfg *gatewayConfig) addFlags(fs *flag.FlagSet) {
	fs.StringVar(&cfg.listen, "listen", "", "serve agents and callers on `addr`ess host:port; port 0 picks one (required)")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "serve TLS with the PEM certificate (chain) in `file`; needs --tls-key")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "PEM private key `file` of --tls-cert")
	fs.StringVar(&cfg.clientCA, "client-ca", "", "require client certificates issued by a CA in this PEM `file`, from agents\nand callers alike; needs --tls-cert")
	fs.StringVar(&cfg.tokenFile, "token-file", "", "admit only agents that present a token of this `file`: one token a line,\noptionally followed by the one agent key it may open tunnels for;\nblank lines and # comments are skipped")
	fs.BoolVar(&cfg.keyFromCert, "agent-key-from-cert", false, "admit an agent only for a key its client certificate names, as common name\nor DNS name, so that no agent can take a share of another's calls;\nneeds --client-ca")
	fs.StringVar(&cfg.callerTokens, "caller-token-file", "", "admit only callers that present a token of this `file` in the\n"+callerTokenHeader+" header (Bearer <token>), which is not forwarded:\none token a line, optionally followed by the one agent key it may call;\nhealth checks need no token")
	fs.StringVar(&cfg.metrics, "metrics", "", "serve Prometheus metrics over HTTP at `addr`ess/metrics, and a live dashboard of agents and refusals at address/")
	fs.StringVar(&cfg.keyHeader, "key-header", gateway.DefaultKeyHeader, "`header` that names the agent, on agents' tunnels and callers' calls")
	fs.DurationVar(&cfg.drainTimeout, "drain-timeout", defaultDrainTimeout, "on SIGINT or SIGTERM, wait up to `duration` for calls in progress before closing them")
	fs.BoolVar(&cfg.compress, "compress", false, "gzip the calls forwarded to agents, and their answers, on the tunnels;\nagents of other implementations get them uncompressed")
	fs.IntVar(&cfg.maxMsgSize, "max-msg-size", defaultMaxMsgSize, "accept messages of up to `bytes` from callers and agents; agents need\nthe same --max-msg-size for requests that large")
	fs.IntVar(&cfg.maxStreams, "max-streams-per-conn", gateway.DefaultMaxStreamsPerConnection, "let one client connection have at most `n` calls in progress, so that\nno caller can hold an agent's whole capacity (further calls wait in the\ncaller's gRPC client); 0 for no bound")
	fs.IntVar(&cfg.windowSize, "window-size", gateway.DefaultWindowSize, windowSizeUsage)
	fs.BoolVar(&cfg.accessLog, "access-log", false, "log a \""+gateway.AccessLogMessage+"\" line for every call: method, agent key, code, duration,\n"+
		"payload bytes each way, the caller's address and certificate subject;\nwritten with the other lines (--log-format) even under --log-level warn")
	cfg.cluster.add(fs)
	cfg.keepalive.add(fs,
		"ping an agent when its tunnel, or its connection, has been silent for `duration`",
		"give an agent up when a ping has had no answer for `duration`: its tunnel,\nor its connection, closes with the calls on it")
}

// defaultGatewayConfig is the configuration of the gateway when no flag is given.
func defaultGatewayConfig() gatewayConfig {
	var cfg gatewayConfig
	cfg.addFlags(flag.NewFlagSet("defaults", flag.ContinueOnError))
	return cfg
}
