// Package embedetcd runs a one-member etcd inside the process, on loopback
// ports, with etcd's own embed package: the etcd that the demo of a gateway
// cluster and the tests of one stand on. It can be stopped and started
// again on the same data and ports, to play an outage.
package embedetcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// readyTimeout bounds how long Start waits for the member to serve.
const readyTimeout = 20 * time.Second

// Server is an embedded etcd member.
type Server struct {
	cfg *embed.Config
	e   *embed.Etcd
	// URL is the member's client URL, what a client's Endpoints name.
	URL string
}

// Start runs a member keeping its data in dir (an empty directory of the
// caller's), serving clients and its (unused) peer port on loopback ports
// picked now, which Restart keeps.
func Start(dir string) (*Server, error) {
	cfg := embed.NewConfig()
	cfg.Name = "grpctunnel"
	cfg.Dir = dir
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cu, err := freeURL()
	if err != nil {
		return nil, err
	}
	pu, err := freeURL()
	if err != nil {
		return nil, err
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	s := &Server{cfg: cfg, URL: cu.String()}
	if err := s.Restart(context.Background()); err != nil {
		return nil, err
	}
	return s, nil
}

// freeURL returns an http URL on a loopback port that was free a moment
// ago. It is picked here rather than left to the server so that a restart
// listens where the clients already point.
func freeURL() (url.URL, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return url.URL{}, fmt.Errorf("embedetcd: pick a port: %w", err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return url.URL{Scheme: "http", Host: addr}, nil
}

// Restart starts the member again after Stop, on the same data and ports,
// and waits until it serves. A port the stopped member just released may
// stay busy for a moment, so binding is tried again until ctx ends or the
// ready timeout passes.
func (s *Server) Restart(ctx context.Context) error {
	if s.e != nil {
		return errors.New("embedetcd: already running")
	}
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	var err error
	for retry := time.Duration(0); ; retry = min(2*retry+10*time.Millisecond, 200*time.Millisecond) {
		if s.e, err = embed.StartEtcd(s.cfg); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("embedetcd: start: %w", err)
		case <-time.After(retry):
		}
	}
	select {
	case <-s.e.Server.ReadyNotify():
		return nil
	case <-ctx.Done():
		s.Stop()
		return fmt.Errorf("embedetcd: not ready: %w", ctx.Err())
	}
}

// Stop stops the member as if it were killed; its clients see an outage
// until Restart. The server's loop is stopped before its listeners: etcd's
// own Close waits up to its request timeout (7 s) for open streams such as
// watches, and its loop would meanwhile go on revoking leases whose
// keepalives can no longer reach it, which no crash or partition does.
func (s *Server) Stop() {
	if s.e != nil {
		s.e.Server.HardStop()
		s.e.Close()
		s.e = nil
	}
}

// Client returns a client of the member that logs nothing.
func (s *Server) Client() (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{s.URL},
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
}
