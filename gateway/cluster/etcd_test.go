package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/goleak"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testEtcd is a one-member embedded etcd on loopback that a test can stop and
// start again on the same data directory and ports, to play an outage.
type testEtcd struct {
	t    *testing.T
	cfg  *embed.Config
	e    *embed.Etcd
	addr string // client URL
}

// freeURL returns an http URL on a loopback port that was free a moment ago.
// The port is reused across restarts, which is why it is picked here rather
// than left to the server.
func freeURL(t *testing.T) url.URL {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return url.URL{Scheme: "http", Host: addr}
}

func startEtcd(t *testing.T) *testEtcd {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Name = "test"
	cfg.Dir = t.TempDir()
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cu, pu := freeURL(t), freeURL(t)
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	te := &testEtcd{t: t, cfg: cfg, addr: cu.String()}
	te.start()
	t.Cleanup(te.stop)
	return te
}

func (te *testEtcd) start() {
	te.t.Helper()
	var err error
	// A port just released by a stopped server may still be busy for a
	// moment; try a few times.
	for i := 0; i < 50; i++ {
		te.e, err = embed.StartEtcd(te.cfg)
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		te.t.Fatalf("start etcd: %v", err)
	}
	select {
	case <-te.e.Server.ReadyNotify():
	case <-time.After(20 * time.Second):
		te.e.Close()
		te.t.Fatal("etcd not ready")
	}
}

func (te *testEtcd) stop() {
	if te.e != nil {
		te.e.Close()
		te.e = nil
	}
}

func (te *testEtcd) client(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{te.addr},
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// rev returns etcd's current revision: the count of writes so far.
func rev(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := cli.Get(ctx, "rev-probe")
	if err != nil {
		t.Fatal(err)
	}
	return r.Header.Revision
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// join makes a replica with its own client, closed at the end of the test.
func join(t *testing.T, te *testEtcd, id string, ttl time.Duration) (*Directory, *clientv3.Client) {
	t.Helper()
	cli := te.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d, err := Join(ctx, cli, Options{
		Cluster:       "test",
		ReplicaID:     id,
		Addr:          id + ".example:7443",
		TTL:           ttl,
		ProbeInterval: 200 * time.Millisecond,
		Logger:        testLogger(t).With("test_replica", id),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = d.Close(ctx)
	})
	return d, cli
}

// waitFor waits, on the Changed signal, until cond holds on d.
func waitFor(t *testing.T, d *Directory, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		ch := d.Changed()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("%s: timed out after %v waiting for %s", d.Self().ID, timeout, what)
		}
	}
}

func holderIDs(rs []Replica) string { return fmt.Sprint(rs) }
