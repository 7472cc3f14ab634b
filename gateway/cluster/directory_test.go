package cluster

import (
	"context"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func hasHolder(d *Directory, agent, replicaID string) bool {
	return slices.ContainsFunc(d.Holders(agent, false), func(r Replica) bool { return r.ID == replicaID })
}

// TestThreeReplicas: a tunnel added on one replica is seen by the two others,
// quickly and for exactly one etcd write; its removal likewise.
func TestThreeReplicas(t *testing.T) {
	te := startEtcd(t)
	r1, cli := join(t, te, "r1", 5*time.Second)
	r2, _ := join(t, te, "r2", 5*time.Second)
	r3, _ := join(t, te, "r3", 5*time.Second)
	for _, d := range []*Directory{r1, r2, r3} {
		waitFor(t, d, 5*time.Second, "three replicas", func() bool { return len(d.Replicas()) == 3 })
	}
	want := []Replica{{"r1", "r1.example:7443"}, {"r2", "r2.example:7443"}, {"r3", "r3.example:7443"}}
	if got := r2.Replicas(); !slices.Equal(got, want) {
		t.Fatalf("Replicas() = %v, want %v", got, want)
	}

	const agent = "tenant/agent 1?x=%2F"
	before := rev(t, cli)
	start := time.Now()
	remove, err := r1.AddTunnel(agent, "t1")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []*Directory{r2, r3} {
		waitFor(t, d, 5*time.Second, "tunnel seen", func() bool { return hasHolder(d, agent, "r1") })
	}
	t.Logf("add propagated to replicas 2 and 3 in %v", time.Since(start))
	if d := rev(t, cli) - before; d != 1 {
		t.Errorf("etcd writes for one add = %d, want 1", d)
	}
	if got := r2.Holders(agent, false); !slices.Equal(got, want[:1]) {
		t.Errorf("Holders = %v, want %v", got, want[:1])
	}
	if got := r1.Holders(agent, true); len(got) != 0 {
		t.Errorf("Holders(excludeSelf) on the holder = %v, want none", got)
	}
	if got := r1.Holders("tenant", false); len(got) != 0 {
		t.Errorf("a prefix of the agent key has holders %v", got)
	}

	// A second holder: deterministic order, and one entry per replica even
	// with two tunnels.
	rm3a, _ := r3.AddTunnel(agent, "t3a")
	rm3b, _ := r3.AddTunnel(agent, "t3b")
	waitFor(t, r2, 5*time.Second, "second holder", func() bool { return len(r2.Holders(agent, false)) == 2 })
	if got := r2.Holders(agent, false); !slices.Equal(got, []Replica{want[0], want[2]}) {
		t.Errorf("Holders = %v", holderIDs(got))
	}
	if got := r3.Holders(agent, true); !slices.Equal(got, want[:1]) {
		t.Errorf("Holders(excludeSelf) = %v, want %v", got, want[:1])
	}
	rm3a()
	rm3b()
	rm3b() // idempotent
	waitFor(t, r2, 5*time.Second, "second holder gone", func() bool { return len(r2.Holders(agent, false)) == 1 })

	before = rev(t, cli)
	start = time.Now()
	remove()
	for _, d := range []*Directory{r2, r3} {
		waitFor(t, d, 5*time.Second, "tunnel gone", func() bool { return len(d.Holders(agent, false)) == 0 })
	}
	t.Logf("remove propagated in %v", time.Since(start))
	if d := rev(t, cli) - before; d != 1 {
		t.Errorf("etcd writes for one remove = %d, want 1", d)
	}

	// The key on etcd is escaped: one level per segment.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := r1.AddTunnel(agent, "t/2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, r3, 5*time.Second, "escaped tunnel", func() bool { return hasHolder(r3, agent, "r1") })
	got, err := cli.Get(ctx, "/test/tunnels/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Kvs) != 1 || string(got.Kvs[0].Key) != "/test/tunnels/tenant%2Fagent%201%3Fx=%252F/r1/t%2F2" {
		t.Errorf("keys = %q", got.Kvs)
	}

	// Close revokes at once: r1's entries vanish without waiting for the TTL.
	start = time.Now()
	if err := r1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r1.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitFor(t, r2, 2*time.Second, "closed replica gone", func() bool {
		return len(r2.Replicas()) == 2 && len(r2.Holders(agent, false)) == 0
	})
	t.Logf("Close propagated in %v", time.Since(start))
	if _, err := r1.AddTunnel("a", "b"); err != ErrClosed {
		t.Errorf("AddTunnel after Close: %v, want ErrClosed", err)
	}
}

// TestCrashExpires: a replica that dies without Close (its client closed, so
// no keepalive) has its entries vanish after the TTL.
func TestCrashExpires(t *testing.T) {
	te := startEtcd(t)
	r1, cli1 := join(t, te, "r1", 2*time.Second)
	r2, _ := join(t, te, "r2", 2*time.Second)
	if _, err := r1.AddTunnel("agent", "t1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, r2, 5*time.Second, "tunnel seen", func() bool { return hasHolder(r2, "agent", "r1") })
	start := time.Now()
	_ = cli1.Close()
	waitFor(t, r2, 10*time.Second, "crashed replica expired", func() bool {
		return len(r2.Holders("agent", false)) == 0 && len(r2.Replicas()) == 1
	})
	el := time.Since(start)
	t.Logf("crashed replica's entries vanished after %v (TTL 2s)", el)
	if el < time.Second {
		t.Errorf("entries vanished after %v, before the TTL", el)
	}
}

// TestLeaseLost: when the lease is gone (as after an outage longer than the
// TTL), the replica takes a new one and registers itself and all its local
// tunnels again.
func TestLeaseLost(t *testing.T) {
	te := startEtcd(t)
	r1, _ := join(t, te, "r1", 2*time.Second)
	r2, cli2 := join(t, te, "r2", 2*time.Second)
	for _, a := range []string{"a1", "a2", "a3"} {
		if _, err := r1.AddTunnel(a, "t"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, r2, 5*time.Second, "tunnels seen", func() bool { return hasHolder(r2, "a3", "r1") })
	r1.mu.Lock()
	lease := r1.lease
	r1.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli2.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	waitFor(t, r2, 5*time.Second, "entries gone", func() bool { return len(r2.Replicas()) == 1 })
	start := time.Now()
	waitFor(t, r2, 10*time.Second, "re-registered", func() bool {
		return len(r2.Replicas()) == 2 && hasHolder(r2, "a1", "r1") && hasHolder(r2, "a2", "r1") && hasHolder(r2, "a3", "r1")
	})
	t.Logf("re-registered %v after the lease was revoked", time.Since(start))
	waitFor(t, r1, 5*time.Second, "own view reloaded", func() bool { return hasHolder(r1, "a3", "r1") && len(r1.Replicas()) == 2 })
}

// TestEtcdOutage: etcd stops and starts again on the same data and ports.
// The replicas keep their last directory and report the outage, then recover;
// a tunnel added during the outage appears afterwards.
func TestEtcdOutage(t *testing.T) {
	te := startEtcd(t)
	r1, _ := join(t, te, "r1", 2*time.Second)
	r2, _ := join(t, te, "r2", 2*time.Second)
	if _, err := r1.AddTunnel("agent", "t1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, r2, 5*time.Second, "tunnel seen", func() bool { return hasHolder(r2, "agent", "r1") })

	te.stop()
	for _, d := range []*Directory{r1, r2} {
		waitFor(t, d, 10*time.Second, "unhealthy", func() bool { ok, _ := d.Healthy(); return !ok })
		_, err := d.Healthy()
		t.Logf("%s unhealthy: %v", d.Self().ID, err)
	}
	if !hasHolder(r2, "agent", "r1") || len(r2.Replicas()) != 2 {
		t.Fatalf("directory lost during the outage: %v", r2.Replicas())
	}
	if _, err := r1.AddTunnel("agent-during-outage", "t2"); err != nil {
		t.Fatal(err)
	}
	// Outlast the TTL so that the client gives up on the lease.
	time.Sleep(2500 * time.Millisecond)
	te.start()
	start := time.Now()
	for _, d := range []*Directory{r1, r2} {
		waitFor(t, d, 15*time.Second, "healthy again", func() bool { ok, _ := d.Healthy(); return ok })
	}
	waitFor(t, r2, 15*time.Second, "tunnel added during the outage", func() bool {
		return hasHolder(r2, "agent-during-outage", "r1") && hasHolder(r2, "agent", "r1") && len(r2.Replicas()) == 2
	})
	t.Logf("recovered %v after etcd restarted", time.Since(start))
}
