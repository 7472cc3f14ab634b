package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/cluster"
	"github.com/grpctunnel/grpctunnel/internal/window"
)

// joinTimeout bounds how long a starting replica waits for etcd: a
// replica that cannot register cannot be found by the others, so it is
// better to fail and be restarted than to serve alone.
const joinTimeout = 30 * time.Second

// clusterFlags is the part of the gateway's command line that makes it one
// replica of a cluster.
type clusterFlags struct {
	etcd          string
	name          string
	replicaID     string
	peerListen    string
	peerAdvertise string
	tokenFile     string
	leaseTTL      time.Duration
	peerCA        string
	etcdCA        string
	etcdCert      string
	etcdKey       string
}

func (c *clusterFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&c.etcd, "etcd", "", "join a cluster of gateway replicas whose directory of agents is kept in\nthe etcd at these comma-separated client `URLs`; without it the gateway\nworks alone")
	fs.StringVar(&c.name, "cluster", cluster.DefaultCluster, "`name` of the cluster to join, the etcd key prefix of its directory\n(/name); replicas of different clusters may share one etcd")
	fs.StringVar(&c.replicaID, "replica-id", "", "`id` of this replica in the cluster, unique among live replicas\n(default: the host name and a random suffix, new at each start)")
	fs.StringVar(&c.peerListen, "peer-listen", "", "serve the other replicas' forwarded calls on `addr`ess host:port\n(required with --etcd); it admits replicas only")
	fs.StringVar(&c.peerAdvertise, "peer-advertise", "", "`addr`ess at which the other replicas reach --peer-listen (default:\n--peer-listen, with the bound port if it is 0)")
	fs.StringVar(&c.tokenFile, "cluster-token-file", "", "`file` holding the secret token the replicas of the cluster share\n(required with --etcd); it proves a forwarded call comes from a replica.\nOne token a line: the first is sent, any is accepted, so that the\ncluster can move to a new one with SIGHUP and no restart")
	fs.DurationVar(&c.leaseTTL, "lease-ttl", cluster.DefaultTTL, "how long a replica that dies stays in the directory before etcd drops\nit and its agents; a replica that stops cleanly leaves at once")
	fs.StringVar(&c.peerCA, "peer-ca", "", "with TLS, the PEM `file` of the CA that issued the replicas'\ncertificates (--tls-cert), which they present to each other on the peer\nport (default: --client-ca)")
	fs.StringVar(&c.etcdCA, "etcd-ca", "", "PEM `file` of the CA of etcd's TLS certificate, for https URLs")
	fs.StringVar(&c.etcdCert, "etcd-cert", "", "PEM client certificate `file` to present to etcd; needs --etcd-key")
	fs.StringVar(&c.etcdKey, "etcd-key", "", "PEM private key `file` of --etcd-cert")
}

// check says what is wrong with the cluster flags, given whether the
// gateway serves TLS and its client CA; "" if nothing.
func (c *clusterFlags) check(gatewayTLS bool, clientCA string) string {
	if c.etcd == "" {
		for _, f := range []struct{ name, value string }{
			{"peer-listen", c.peerListen}, {"peer-advertise", c.peerAdvertise}, {"cluster-token-file", c.tokenFile},
			{"peer-ca", c.peerCA}, {"replica-id", c.replicaID}, {"etcd-ca", c.etcdCA}, {"etcd-cert", c.etcdCert},
		} {
			if f.value != "" {
				return "--" + f.name + " makes sense only in a cluster: give --etcd too"
			}
		}
		return ""
	}
	switch {
	case c.peerListen == "":
		return "--etcd needs --peer-listen: the other replicas forward calls there"
	case c.tokenFile == "":
		return "--etcd needs --cluster-token-file: the replicas prove to each other that they are replicas with it"
	case c.name == "" || strings.ContainsAny(c.name, "/ "):
		return "--cluster must be a name without '/' or spaces"
	case c.leaseTTL < time.Second:
		return "--lease-ttl must be at least 1s"
	case (c.etcdCert == "") != (c.etcdKey == ""):
		return "--etcd-cert and --etcd-key go together"
	case gatewayTLS && c.peerCA == "" && clientCA == "":
		return "a cluster of TLS gateways needs --peer-ca (or --client-ca), the CA that issued the replicas' certificates, so that the peer port admits replicas only"
	case !gatewayTLS && c.peerCA != "":
		return "--peer-ca needs TLS: give --tls-cert and --tls-key too"
	}
	for _, u := range strings.Split(c.etcd, ",") {
		if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			return fmt.Sprintf("--etcd %q is not an etcd client URL: give http://host:port or https://host:port", u)
		}
	}
	return ""
}

// replica is this gateway's membership of its cluster: the etcd client,
// the directory, the connections to the other replicas and the server of
// its peer port.
type replica struct {
	cli     *clientv3.Client
	dir     *cluster.Directory
	peering *cluster.Peering
	tokens  *reloadable[[]string] // the cluster's tokens, the first sent
	peerSrv *grpc.Server
	peerLis net.Listener
	// tls is the peer port's TLS configuration and its clients', reread
	// with the gateway's certificate on SIGHUP; nil without TLS.
	tls  *reloadable[tls.Config]
	log  *slog.Logger
	done chan struct{} // closed when the peer server has returned
}

// joinCluster binds the peer port, connects to etcd and joins the
// directory. loadTLS reads the gateway's TLS configuration (nil for
// none), which the peer port shares; reload rereads it and the cluster's
// tokens. windowSize is the gateway's window option, which the
// connections to the other replicas use too.
func joinCluster(c clusterFlags, loadTLS func() (*tls.Config, error), clientCA string, windowSize int, reload *reloader, log *slog.Logger) (*replica, error) {
	load := func() (*[]string, error) { return readClusterTokens(c.tokenFile) }
	tokens, err := load()
	if err != nil {
		return nil, err
	}
	r := &replica{tokens: newReloadable(tokens), log: log, done: make(chan struct{})}
	// The tokens are secrets: the log says only how many there are.
	addReloadable(reload, "cluster_tokens", r.tokens, load, func(t *[]string) []any { return []any{"cluster_tokens", len(*t)} })
	if loadTLS != nil {
		caFile := cmp.Or(c.peerCA, clientCA)
		loadPeer := func() (*tls.Config, error) {
			gatewayTLS, err := loadTLS()
			if err != nil {
				return nil, err
			}
			return peerTLS(gatewayTLS, caFile)
		}
		cfg, err := loadPeer()
		if err != nil {
			return nil, err
		}
		r.tls = newReloadable(cfg)
		addReloadable(reload, "peer_tls", r.tls, loadPeer, func(c *tls.Config) []any { return describeTLS(c, "peer_cert") })
	}
	etcdCfg := clientv3.Config{
		Endpoints:   strings.Split(c.etcd, ","),
		DialTimeout: 5 * time.Second,
		// The directory logs etcd's outages and recoveries itself, once
		// each; the client's own log would repeat every retry.
		Logger: zap.NewNop(),
	}
	if c.etcdCA != "" || c.etcdCert != "" || strings.Contains(c.etcd, "https://") {
		if etcdCfg.TLS, err = clientTLS(c.etcdCA, c.etcdCert, c.etcdKey, ""); err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
	}
	if r.cli, err = clientv3.New(etcdCfg); err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	if r.peerLis, err = net.Listen("tcp", c.peerListen); err != nil {
		r.cli.Close()
		return nil, fmt.Errorf("peer port: %w", err)
	}
	advertise, err := advertised(c.peerAdvertise, c.peerListen, r.peerLis.Addr())
	if err != nil {
		r.peerLis.Close()
		r.cli.Close()
		return nil, err
	}
	id := c.replicaID
	if id == "" {
		id = defaultReplicaID()
	}
	ctx, cancel := context.WithTimeout(context.Background(), joinTimeout)
	defer cancel()
	r.dir, err = cluster.Join(ctx, r.cli, cluster.Options{
		Cluster: c.name, ReplicaID: id, Addr: advertise, TTL: c.leaseTTL, Logger: log,
	})
	if err != nil {
		r.peerLis.Close()
		r.cli.Close()
		return nil, fmt.Errorf("joining cluster %q at %s: %w", c.name, c.etcd, err)
	}
	dial := append(window.DialOptions(windowSize), grpc.WithTransportCredentials(r.peerCreds()))
	r.peering = cluster.NewPeering(r.dir, dial...)
	return r, nil
}

// readClusterTokens reads the cluster's token file: one token a line,
// blank lines and # comments skipped.
func readClusterTokens(file string) (*[]string, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading the cluster token file: %w", err)
	}
	var tokens []string
	for line := range strings.Lines(string(data)) {
		fields, ok := tokenLine(line)
		if !ok {
			continue
		}
		if len(fields) != 1 {
			return nil, fmt.Errorf("cluster token file %s: a line holds %d words; each line holds one token", file, len(fields))
		}
		tokens = append(tokens, fields[0])
	}
	if len(tokens) == 0 {
		return nil, fmt.Errorf("cluster token file %s: no token", file)
	}
	return &tokens, nil
}

// clusterTokens returns the cluster's tokens now, for
// gateway.Options.ClusterTokens.
func (r *replica) clusterTokens() []string { return *r.tokens.load() }

// peerTLS is the TLS configuration of the peer port and of the
// connections to the other replicas' peer ports: each replica presents its
// own gateway certificate, and admits, or trusts, only certificates the
// cluster's CA issued. A replica is checked against its address like any
// TLS server, so --peer-advertise must be a name or address its
// certificate holds.
//
// The peer port admits only server certificates (those good for server
// authentication as well as client authentication, as a gateway's
// certificate from grpctunnel certs is): where the cluster's CA is also
// the one of --client-ca, it issues the agents' and callers' certificates
// too, which are for client authentication alone, and none of those may
// pass for a replica's.
func peerTLS(gatewayTLS *tls.Config, caFile string) (*tls.Config, error) {
	pool, err := loadCAs(caFile)
	if err != nil {
		return nil, fmt.Errorf("peer CA: %w", err)
	}
	cfg := gatewayTLS.Clone()
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	cfg.ClientCAs = pool
	cfg.RootCAs = pool
	cfg.VerifyPeerCertificate = func(_ [][]byte, chains [][]*x509.Certificate) error {
		if len(chains) == 0 || len(chains[0]) == 0 {
			return nil // a client verifying the server: crypto/tls did it all
		}
		if !isServerCert(chains[0][0]) {
			return errNotReplicaCert
		}
		return nil
	}
	return cfg, nil
}

// errNotReplicaCert is the handshake error of a client certificate that is
// not a replica's.
var errNotReplicaCert = errors.New("the peer port admits gateway replicas only, and this certificate is not for a server")

// isServerCert reports whether cert is good for server authentication.
func isServerCert(cert *x509.Certificate) bool {
	if len(cert.ExtKeyUsage) == 0 {
		return true // no restriction: good for anything
	}
	return slices.ContainsFunc(cert.ExtKeyUsage, func(u x509.ExtKeyUsage) bool {
		return u == x509.ExtKeyUsageServerAuth || u == x509.ExtKeyUsageAny
	})
}

// peerCreds are the credentials of the connections to the other replicas.
func (r *replica) peerCreds() credentials.TransportCredentials {
	if r.tls == nil {
		return insecure.NewCredentials()
	}
	return reloadingTLS{r.tls}
}

// advertised is the peer address the other replicas are to dial: the one
// given, or the listening address if it names a host, with the bound port
// if it asked for port 0.
func advertised(advertise, listen string, bound net.Addr) (string, error) {
	if advertise != "" {
		return advertise, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("--peer-listen %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return "", fmt.Errorf("--peer-listen %q names no host the other replicas can dial: give --peer-advertise", listen)
	}
	if port == "0" {
		_, port, _ = net.SplitHostPort(bound.String())
	}
	return net.JoinHostPort(host, port), nil
}

// defaultReplicaID is the host name with a random suffix: readable in
// logs and ListAgents, and new at each start, so that a replica that
// restarts before its old lease expires is not taken for its old self.
func defaultReplicaID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "gateway"
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}

// serve starts the peer port for g.
func (r *replica) serve(g *gateway.Gateway, failed chan<- error) {
	opts := g.PeerServerOptions()
	if r.tls != nil {
		// Through the gateway's wrapper, so that a refused handshake (a
		// certificate that is not a replica's) is logged and counted.
		opts = append(opts, grpc.Creds(g.Credentials(reloadingTLS{r.tls})))
	}
	r.peerSrv = grpc.NewServer(opts...)
	go func() {
		defer close(r.done)
		if err := r.peerSrv.Serve(r.peerLis); err != nil {
			failed <- fmt.Errorf("peer port: %w", err)
		}
	}()
	r.log.Info("replica joined the cluster", "replica", r.dir.Self().ID, "peer_addr", r.dir.Self().Addr,
		"peer_listen", r.peerLis.Addr().String(), "peer_tls", r.tls != nil, "replicas", len(r.dir.Replicas()))
	if r.tls == nil {
		r.log.Warn("peer port without TLS: forwarded calls and the cluster token travel in plaintext between replicas")
	}
}

// awaitWithdrawn waits until this replica's copy of the directory shows
// none of its tunnels, for at most timeout or until a second signal.
func (r *replica) awaitWithdrawn(ctx context.Context, timeout time.Duration) {
	self := r.dir.Self().ID
	expired := time.After(timeout)
	for {
		changed := r.dir.Changed()
		if r.dir.TunnelsOf(self) == 0 {
			return
		}
		select {
		case <-changed:
		case <-expired:
			r.log.Warn("withdrawing from the cluster: the directory still shows tunnels of this replica; draining anyway", "timeout", timeout.String())
			return
		case <-forced(ctx):
			return
		}
	}
}

// stop leaves the cluster: the peer port finishes the calls forwarded to
// it (for at most drain), then the lease is revoked, so that this
// replica's entries vanish from every directory at once.
func (r *replica) stop(ctx context.Context, drain time.Duration) {
	if r.peerSrv != nil {
		waitBounded(ctx, drain, r.peerSrv.GracefulStop, r.peerSrv.Stop)
		<-r.done
	} else {
		r.peerLis.Close()
	}
	r.peering.Close()
	closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.dir.Close(closeCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		r.log.Warn("leaving the cluster: could not revoke the lease; the entries expire with it", "err", err)
	}
	_ = r.cli.Close()
}

// register adds the cluster's metrics to reg: whether etcd answers, and
// how many replicas the directory shows.
func (r *replica) register(reg prometheus.Registerer) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "grpctunnel_gateway_cluster_etcd_up",
			Help: "1 if this replica is in touch with etcd; 0 while it serves with the last directory it saw.",
		}, func() float64 {
			if ok, _ := r.dir.Healthy(); ok {
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "grpctunnel_gateway_cluster_replicas",
			Help: "Replicas of the cluster in this replica's directory, itself included.",
		}, func() float64 { return float64(len(r.dir.Replicas())) }),
	)
}

// health is the cluster's part of the gateway's /healthz answer.
func (r *replica) health() map[string]any {
	ok, err := r.dir.Healthy()
	h := map[string]any{"replica": r.dir.Self().ID, "etcd_connected": ok, "replicas": len(r.dir.Replicas())}
	if err != nil {
		h["etcd_error"] = err.Error()
	}
	return h
}
