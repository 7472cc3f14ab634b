package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testEtcd is a one-member embedded etcd on loopback that a test can stop and
// start again on the same data directory and ports, to play an outage.
type testEtcd struct {
	t *testing.T
	*embedetcd.Server
	addr string // client URL
}

func startEtcd(t *testing.T) *testEtcd {
	t.Helper()
	s, err := embedetcd.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return &testEtcd{t: t, Server: s, addr: s.URL}
}

func (te *testEtcd) start() {
	te.t.Helper()
	if err := te.Restart(context.Background()); err != nil {
		te.t.Fatal(err)
	}
}

func (te *testEtcd) stop() { te.Stop() }

func (te *testEtcd) client(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := te.Client()
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
