package cluster

import (
	"fmt"
	"runtime"
	"testing"
)

// TestViewMemory measures what one directory entry costs in memory, with
// 10,000 tunnels of distinct agents spread over three replicas, keys as a
// gateway would make them.
func TestViewMemory(t *testing.T) {
	const n = 10000
	const prefix = "/grpctunnel/prod"
	keys := make([]string, n)
	for i := range keys {
		keys[i] = tunnelKey(prefix, fmt.Sprintf("tenant-%03d/agent-%05d", i%100, i), fmt.Sprintf("gateway-replica-%d", i%3), fmt.Sprintf("%016x", i*7919))
	}
	val := []byte(`{"addr":"10.0.0.1:7443"}`)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v := newView(prefix)
	for r := 0; r < 3; r++ {
		v.apply(replicaKey(prefix, fmt.Sprintf("gateway-replica-%d", r)), val, true)
	}
	for _, k := range keys {
		if !v.apply(k, nil, true) {
			t.Fatalf("not applied: %s", k)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("%d entries: %.0f bytes per entry", n, per)
	if per > 1024 {
		t.Errorf("%.0f bytes per entry, want <= 1024", per)
	}
	if len(v.replicas) != 3 || len(v.agents) != n {
		t.Fatalf("replicas %d agents %d", len(v.replicas), len(v.agents))
	}
	// Replica records are shared, not copied per entry.
	if a, b := v.agents[keysAgent(0)][0].rep, v.agents[keysAgent(3)][0].rep; a != b {
		t.Error("entries of one replica do not share its record")
	}
	for _, k := range keys {
		if !v.apply(k, nil, false) {
			t.Fatalf("not removed: %s", k)
		}
	}
	if len(v.agents) != 0 || len(v.replicas) != 3 {
		t.Fatalf("after removal: replicas %d agents %d", len(v.replicas), len(v.agents))
	}
	runtime.KeepAlive(v)
}

func keysAgent(i int) string { return fmt.Sprintf("tenant-%03d/agent-%05d", i%100, i) }

// TestViewKeys covers parsing: escaping, foreign keys, unknown layout.
func TestViewKeys(t *testing.T) {
	v := newView("/p")
	cases := []struct {
		key  string
		want bool
	}{
		{"/p/tunnels/" + "a%2Fb" + "/r/t", true},
		{"/p/tunnels/a/b/r/t", false}, // unescaped '/': not ours
		{"/p/tunnels/a/r", false},
		{"/other/tunnels/a/r/t", false},
		{"/p/replicas/x/y", false},
		{"/p/tunnels/%zz/r/t", false},
	}
	for _, c := range cases {
		if got := v.apply(c.key, nil, true); got != c.want {
			t.Errorf("apply(%q) = %v, want %v", c.key, got, c.want)
		}
	}
	if _, ok := v.agents["a/b"]; !ok {
		t.Error("escaped agent key not unescaped")
	}
	if v.apply(replicaKey("/p", "r"), []byte("not json"), true) {
		t.Error("bad replica value applied")
	}
}
