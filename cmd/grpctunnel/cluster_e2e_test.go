package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

// testCluster is an embedded etcd and the gateway replicas of one cluster
// on it, each a process of the command on fixed loopback ports, so that a
// restarted replica listens where callers and agents already point.
type testCluster struct {
	t        *testing.T
	ctx      context.Context
	bin      string
	etcd     *embedetcd.Server
	tokens   []string // cluster token file of each replica
	addrs    []string // callers' and agents' port of each replica
	peers    []string // peer port of each replica
	replicas []*process
	restarts int
}

// startTestCluster starts n replicas of a cluster on a new embedded etcd.
func startTestCluster(t *testing.T, ctx context.Context, bin string, n int) *testCluster {
	t.Helper()
	etcd, err := embedetcd.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Stop)
	c := &testCluster{t: t, ctx: ctx, bin: bin, etcd: etcd}
	dir := t.TempDir()
	for i := range n {
		c.addrs = append(c.addrs, freeAddr(t))
		c.peers = append(c.peers, freeAddr(t))
		c.tokens = append(c.tokens, writeFile(t, dir, fmt.Sprintf("cluster-token-%d", i+1), []byte("a-secret-of-the-replicas\n")))
	}
	c.replicas = make([]*process, n)
	for i := range n {
		c.start(i)
	}
	return c
}

// freeAddr is a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// start runs replica i (again) and waits until it serves.
func (c *testCluster) start(i int) {
	c.t.Helper()
	id := fmt.Sprintf("gw-%d", i+1)
	if c.restarts > 0 {
		id = fmt.Sprintf("gw-%d-r%d", i+1, c.restarts)
	}
	p := startProcess(c.t, id, c.bin, "gateway", "--listen", c.addrs[i], "--log-format", "json",
		"--etcd", c.etcd.URL, "--cluster", "e2e", "--replica-id", id, "--peer-listen", c.peers[i],
		"--cluster-token-file", c.tokens[i], "--lease-ttl", "2s", "--drain-timeout", "10s")
	p.log.waitMsg(c.t, c.ctx, "replica joined the cluster")
	p.log.waitMsg(c.t, c.ctx, "listening")
	c.replicas[i] = p
}

// id is replica i's id as its log gave it.
func (c *testCluster) id(i int) string {
	rec := c.replicas[i].log.waitMsg(c.t, c.ctx, "replica joined the cluster")
	id, _ := rec["replica"].(string)
	return id
}

// routes waits until a call for key through conn reaches its service.
func routes(t *testing.T, ctx context.Context, conn grpc.ClientConnInterface, key string) {
	t.Helper()
	client := demopb.NewDeviceServiceClient(conn)
	testkit.WaitFor(t, func() bool {
		callCtx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "tunnel-key", key), time.Second)
		defer cancel()
		_, err := client.GetStatus(callCtx, &demopb.GetStatusRequest{})
		return err == nil
	})
}

// TestClusterEndToEnd runs three replicas as processes of the command on
// an embedded etcd: an agent connected to replica 1 is called with grpcurl
// through replicas 2 and 3, ListAgents on any replica shows the whole
// cluster, and with a second agent of the same key on replica 2, the agent
// stays reachable through replica 3 while replica 1 dies (SIGKILL, no
// lease revoked) until its entries expire.
func TestClusterEndToEnd(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops the processes with signals")
	}
	grpcurl := findGrpcurl(t)
	bin := buildCommand(t)
	ctx := testContext(t)
	c := startTestCluster(t, ctx, bin, 3)
	target := startTarget(t, "cluster-device")
	startProcess(t, "agent-1", bin, "agent", "--gateway", c.addrs[0], "--key", "site", "--target", target, "--log-format", "json")
	for i := 1; i < 3; i++ {
		routes(t, ctx, dial(t, c.addrs[i], insecure.NewCredentials()), "site")
	}

	grpcurlOK := func(args ...string) string {
		t.Helper()
		out, err := runGrpcurl(ctx, grpcurl, args...)
		if err != nil {
			t.Fatalf("grpcurl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	for i := 1; i < 3; i++ {
		header := []string{"-plaintext", "-H", "tunnel-key: site"}
		if list := grpcurlOK(append(header, c.addrs[i], "list")...); !strings.Contains(list, "grpctunnel.demo.v1.DeviceService") {
			t.Errorf("list through replica %d:\n%s", i+1, list)
		}
		var st struct{ ServedBy string }
		decodeAll(t, grpcurlOK(append(header, c.addrs[i], "grpctunnel.demo.v1.DeviceService/GetStatus")...), func(d *json.Decoder) error { return d.Decode(&st) })
		if st.ServedBy != "cluster-device" {
			t.Errorf("GetStatus through replica %d: servedBy %q", i+1, st.ServedBy)
		}
		var tail []string
		decodeAll(t, grpcurlOK(append(header, "-d", `{"lines": 3}`, c.addrs[i], "grpctunnel.demo.v1.DeviceService/Tail")...), func(d *json.Decoder) error {
			var msg struct{ Line string }
			if err := d.Decode(&msg); err != nil {
				return err
			}
			tail = append(tail, msg.Line)
			return nil
		})
		if len(tail) != 3 {
			t.Errorf("Tail through replica %d: %q, want 3 lines", i+1, tail)
		}
	}
	var list struct {
		Agents []struct {
			Key     string
			Tunnels []struct{ Replica string }
		}
	}
	decodeAll(t, grpcurlOK("-plaintext", c.addrs[2], "grpctunnel.admin.v1.AdminService/ListAgents"), func(d *json.Decoder) error { return d.Decode(&list) })
	if len(list.Agents) != 1 || len(list.Agents[0].Tunnels) != 1 || list.Agents[0].Tunnels[0].Replica != c.id(0) {
		t.Errorf("ListAgents through replica 3: %+v; want agent site with one tunnel on %s", list, c.id(0))
	}

	// A second agent of the key on replica 2; then replica 1 dies.
	startProcess(t, "agent-2", bin, "agent", "--gateway", c.addrs[1], "--key", "site", "--target", target, "--log-format", "json")
	admin := adminpb.NewAdminServiceClient(dial(t, c.addrs[2], insecure.NewCredentials()))
	testkit.WaitFor(t, func() bool {
		resp, err := admin.ListAgents(ctx, &adminpb.ListAgentsRequest{Key: "site"})
		return err == nil && len(resp.GetAgents()) == 1 && len(resp.GetAgents()[0].GetTunnels()) == 2
	})
	load := startLoad(t, ctx, dial(t, c.addrs[2], insecure.NewCredentials()), "site", 2)
	load.waitCalls(t, 20)
	if err := c.replicas[0].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-c.replicas[0].done
	killed := time.Now()
	testkit.WaitFor(t, func() bool {
		resp, err := admin.ListAgents(ctx, &adminpb.ListAgentsRequest{})
		if err != nil || len(resp.GetUnreachableReplicas()) > 0 || len(resp.GetAgents()) != 1 {
			return false
		}
		tunnels := resp.GetAgents()[0].GetTunnels()
		return len(tunnels) == 1 && tunnels[0].GetReplica() == c.id(1)
	})
	t.Logf("the killed replica left the directory %v after it died", time.Since(killed).Round(10*time.Millisecond))
	load.waitCalls(t, load.calls.Load()+20)
	calls, failed := load.stop()
	// Only calls running through the replica that died may fail; the
	// caller is sequential on each of its 2 streams of calls.
	if failed > 2 {
		t.Errorf("%d of %d calls through replica 3 failed while replica 1 died; at most the 2 in progress may", failed, calls)
	}
	t.Logf("%d calls through replica 3 while replica 1 died, %d failed", calls, failed)
	for _, p := range c.replicas[1:] {
		p.terminate(t)
	}
}

// TestClusterRollingRestart restarts each of three replicas in turn
// (SIGTERM, then start again on the same ports) while callers call an
// agent through all of them with client-side round-robin, and the agent,
// given every replica's address, keeps its two tunnels on two distinct
// replicas: no call fails.
func TestClusterRollingRestart(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops the processes with signals")
	}
	bin := buildCommand(t)
	ctx := testContext(t)
	c := startTestCluster(t, ctx, bin, 3)
	target := startTarget(t, "rolling-device")
	startProcess(t, "agent", bin, "agent", "--gateway", strings.Join(c.addrs, ","), "--tunnels", "2",
		"--key", "site", "--target", target, "--log-format", "json")
	// waitTunnels waits until the agent's two tunnels are on two replicas
	// and every replica routes to it.
	waitTunnels := func() {
		t.Helper()
		admin := adminpb.NewAdminServiceClient(dial(t, c.addrs[2], insecure.NewCredentials()))
		testkit.WaitFor(t, func() bool {
			resp, err := admin.ListAgents(ctx, &adminpb.ListAgentsRequest{Key: "site"})
			if err != nil || len(resp.GetUnreachableReplicas()) != 0 || len(resp.GetAgents()) != 1 {
				return false
			}
			tunnels := resp.GetAgents()[0].GetTunnels()
			return len(tunnels) == 2 && tunnels[0].GetReplica() != tunnels[1].GetReplica()
		})
		for _, addr := range c.addrs {
			routes(t, ctx, dial(t, addr, insecure.NewCredentials()), "site")
		}
	}
	waitTunnels()

	// Callers spread over every replica, as behind a load balancer.
	r := manual.NewBuilderWithScheme("replicas")
	var state resolver.State
	for _, a := range c.addrs {
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a})
	}
	r.InitialState(state)
	conn, err := grpc.NewClient("replicas:///cluster", grpc.WithResolvers(r), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	load := startLoad(t, ctx, conn, "site", 4)
	load.waitCalls(t, 50)
	for i := range c.replicas {
		c.replicas[i].terminate(t)
		c.restarts++
		c.start(i)
		waitTunnels()
		load.waitCalls(t, load.calls.Load()+50)
	}
	calls, failed := load.stop()
	t.Logf("%d calls during a rolling restart of 3 replicas, %d failed", calls, failed)
	if failed != 0 {
		t.Errorf("%d of %d calls failed during the rolling restart; first: %v", failed, calls, load.firstErr.Load())
	}
	for _, p := range c.replicas {
		p.terminate(t)
	}
}

// load is callers calling an agent's GetStatus in a loop, counting calls
// and failures.
type load struct {
	calls, failed atomic.Int64
	firstErr      atomic.Value
	cancel        context.CancelFunc
	wg            sync.WaitGroup
}

func startLoad(t *testing.T, ctx context.Context, conn grpc.ClientConnInterface, key string, callers int) *load {
	l := &load{}
	ctx, l.cancel = context.WithCancel(metadata.AppendToOutgoingContext(ctx, "tunnel-key", key))
	client := demopb.NewDeviceServiceClient(conn)
	for range callers {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				callCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := client.GetStatus(callCtx, &demopb.GetStatusRequest{})
				cancel()
				if ctx.Err() != nil {
					return
				}
				l.calls.Add(1)
				if err != nil {
					l.failed.Add(1)
					l.firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	t.Cleanup(func() { l.stop() })
	return l
}

// waitCalls waits until n calls have ended.
func (l *load) waitCalls(t *testing.T, n int64) {
	t.Helper()
	testkit.WaitFor(t, func() bool { return l.calls.Load() >= n })
}

// stop ends the load and returns how many calls ended and failed.
func (l *load) stop() (calls, failed int64) {
	l.cancel()
	l.wg.Wait()
	return l.calls.Load(), l.failed.Load()
}

// TestClusterTokenRotation moves two running replicas to a new cluster
// token with SIGHUP alone, while a caller of replica 2 calls an agent on
// replica 1 the whole time: no call fails, a token file with no token is
// refused and the tokens in use kept, and at the end the old token opens
// no peer port.
func TestClusterTokenRotation(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test signals the processes with SIGHUP")
	}
	const reloaded = "reloaded: new connections, tunnels and calls use it; those open keep going"
	bin := buildCommand(t)
	ctx := testContext(t)
	c := startTestCluster(t, ctx, bin, 2)
	target := startTarget(t, "rotation-device")
	startProcess(t, "agent", bin, "agent", "--gateway", c.addrs[0], "--key", "site", "--target", target, "--log-format", "json")
	conn := dial(t, c.addrs[1], insecure.NewCredentials())
	routes(t, ctx, conn, "site")
	load := startLoad(t, ctx, conn, "site", 2)

	reloads := make([]int, 2)
	step := func(what string, contents ...string) {
		t.Helper()
		for i, data := range contents {
			writeFile(t, filepath.Dir(c.tokens[i]), filepath.Base(c.tokens[i]), []byte(data))
			if err := c.replicas[i].cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			reloads[i]++
			if rec := waitCount(t, ctx, c.replicas[i].log, reloaded, reloads[i]); rec["cluster_tokens"] == nil {
				t.Errorf("%s: replica %d logged %v", what, i+1, rec)
			}
		}
		load.waitCalls(t, load.calls.Load()+50)
	}
	step("the new token accepted", "a-secret-of-the-replicas\nthe-new-secret\n", "a-secret-of-the-replicas\nthe-new-secret\n")
	step("the new token sent", "the-new-secret\na-secret-of-the-replicas\n", "the-new-secret\na-secret-of-the-replicas\n")
	step("the old token gone", "the-new-secret\n", "the-new-secret\n")

	// A file without a token is refused; the replica keeps its token.
	writeFile(t, filepath.Dir(c.tokens[0]), filepath.Base(c.tokens[0]), []byte("# nothing here\n"))
	if err := c.replicas[0].cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	c.replicas[0].log.waitMsg(t, ctx, "reload refused: kept the certificates and tokens in use")
	load.waitCalls(t, load.calls.Load()+50)
	calls, failed := load.stop()
	if failed != 0 {
		t.Errorf("%d of %d calls failed while the cluster token was rotated; first: %v", failed, calls, load.firstErr.Load())
	}

	oldToken := metadata.AppendToOutgoingContext(ctx, "tunnel-key", "site", gateway.PeerHeader, "a-secret-of-the-replicas")
	_, err := demopb.NewDeviceServiceClient(dial(t, c.peers[0], insecure.NewCredentials())).GetStatus(oldToken, &demopb.GetStatusRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("the old token on replica 1's peer port after the rotation: %v, want PermissionDenied", err)
	}
	for _, p := range c.replicas {
		p.terminate(t)
	}
}
