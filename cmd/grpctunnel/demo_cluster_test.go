package main

import (
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDemoCluster runs the cluster's demo and checks its account of each
// step, in order: calls through every replica, crossing to a holder from
// the replica that holds no tunnel, the kill, calls still served after it,
// and the expiry of the dead replica's entries.
func TestDemoCluster(t *testing.T) {
	start := time.Now()
	code, stdout, stderr := runOnce(t, "demo", "--replicas", "3")
	if code != 0 || stderr != "" {
		t.Fatalf("demo --replicas 3: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	t.Logf("the demo took %v", time.Since(start))
	expiry := regexp.MustCompile(`replica-1's lease expired: its entries left the other replicas' directories (\S+) after the kill \(lease TTL 2s\)\n`)
	rest := stdout
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`device service listening on 127\.0\.0\.1:\d+ `),
		regexp.MustCompile(`etcd serving on http://127\.0\.0\.1:\d+, embedded in this process`),
		regexp.MustCompile(`replica-1 listening on 127\.0\.0\.1:\d+ for agents and callers, and on 127\.0\.0\.1:\d+ for the other replicas`),
		regexp.MustCompile(`replica-2 listening on `),
		regexp.MustCompile(`replica-3 listening on `),
		regexp.MustCompile(`agent-1 \(key "demo"\) opened a tunnel to replica-1\n`),
		regexp.MustCompile(`agent-2 \(key "demo"\) opened a tunnel to replica-2\n`),
		regexp.MustCompile(`the directory of every replica shows agent "demo" on replica-1 and replica-2`),
		regexp.MustCompile(`GetStatus entered replica-1, which holds a tunnel of "demo": served through it \(served_by=demo-device calls_served=1\)\n`),
		regexp.MustCompile(`GetStatus entered replica-2, which holds a tunnel of "demo": served through it \(served_by=demo-device calls_served=2\)\n`),
		// Which holder a replica forwards to first is its own business:
		// either will do.
		regexp.MustCompile(`GetStatus entered replica-3, which holds no tunnel of "demo": it crossed to replica-[12], which holds one \(served_by=demo-device calls_served=3\)\n`),
		regexp.MustCompile(`AdminService\.ListAgents through replica-3 .*\n  KEY +REPLICA +AGENT ADDRESS +CALLS\n  demo +replica-1 +127\.0\.0\.1:\d+ +[12]\n  demo +replica-2 +127\.0\.0\.1:\d+ +[12]\n`),
		regexp.MustCompile(`killed replica-1 as a crash would: .*its lease not revoked`),
		regexp.MustCompile(`GetStatus entered replica-2, which holds a tunnel of "demo": served through it \(served_by=demo-device calls_served=4\)\n`),
		regexp.MustCompile(`GetStatus entered replica-3, which holds no tunnel of "demo": it crossed to replica-2, which holds one \(served_by=demo-device calls_served=5\)\n`),
		expiry,
		regexp.MustCompile(`GetStatus entered replica-3, which holds no tunnel of "demo": it crossed to replica-2, which holds one \(served_by=demo-device calls_served=6\)\n`),
		// Only replica 2's tunnel is left, and no replica is unreachable.
		regexp.MustCompile(`AdminService\.ListAgents through replica-3 .*\n  KEY +REPLICA +AGENT ADDRESS +CALLS\n  demo +replica-2 +127\.0\.0\.1:\d+ +\d+\n` +
			`stopped the agents, the replicas, etcd and the device service\n$`),
	} {
		loc := want.FindStringIndex(rest)
		if loc == nil {
			t.Fatalf("the output lacks %q after the lines before it; whole output:\n%s", want, stdout)
		}
		rest = rest[loc[1]:]
	}

	// A lease that was revoked would have taken the entries at once; one
	// left to expire keeps them for what remained of its TTL after its
	// last keepalive, sent every third of it.
	took, err := time.ParseDuration(expiry.FindStringSubmatch(stdout)[1])
	if err != nil || took < time.Second || took > demoStepTimeout {
		t.Errorf("the entries expired %v after the kill (%v); want between 1s and %v", took, err, demoStepTimeout)
	}

	dir := regexp.MustCompile(`its data in (\S+) \(removed at the end\)`).FindStringSubmatch(stdout)
	if dir == nil {
		t.Fatalf("no data directory in the output:\n%s", stdout)
	}
	if _, err := os.Stat(dir[1]); !os.IsNotExist(err) {
		t.Errorf("the demo left %s behind: %v", dir[1], err)
	}
}

// TestDemoReplicasFlag: --replicas 1 is the single gateway's demo, and a
// count out of range, or a flag that only the single gateway's demo takes,
// fails at once and says why.
func TestDemoReplicasFlag(t *testing.T) {
	code, stdout, stderr := runOnce(t, "demo", "--replicas", "1")
	if code != 0 || stderr != "" || !strings.HasSuffix(stdout, "stopped the agent, the gateway and the device service\n") {
		t.Errorf("demo --replicas 1: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--replicas", "0"}, "grpctunnel demo: --replicas must be from 1 to 9, not 0: 1 runs the single gateway, 2 or more a cluster of replicas\n"},
		{[]string{"--replicas", "-1"}, "grpctunnel demo: --replicas must be from 1 to 9, not -1: 1 runs the single gateway, 2 or more a cluster of replicas\n"},
		{[]string{"--replicas", "10"}, "grpctunnel demo: --replicas must be from 1 to 9, not 10: 1 runs the single gateway, 2 or more a cluster of replicas\n"},
		{[]string{"--replicas", "3", "--keep"}, "grpctunnel demo: --keep runs the single gateway's demo only: drop --keep to run the cluster's demo through, or --replicas to keep a gateway running\n"},
		{[]string{"--replicas", "2", "--listen", "127.0.0.1:0"}, "grpctunnel demo: --listen names the single gateway's address; with --replicas each replica takes a free port\n"},
	} {
		code, stdout, stderr := runOnce(t, append([]string{"demo"}, tc.args...)...)
		if code != 2 || stdout != "" || !strings.HasPrefix(stderr, tc.want+"\nUsage: grpctunnel demo ") {
			t.Errorf("demo %q: exit %d, stdout %q, stderr:\n%s\nwant exit 2 and a stderr starting %q", tc.args, code, stdout, stderr, tc.want)
		}
	}
}
