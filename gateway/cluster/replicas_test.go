package cluster

import (
	"bytes"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

const testToken = "replicas-test-token"

// testGateway is a gateway replica on loopback: its directory, its
// peering, its callers' port and its peer port.
type testGateway struct {
	dir     *Directory
	peering *Peering
	g       *gateway.Gateway
	callers *grpc.ClientConn // a caller's connection to it
	addr    string           // its callers' and agents' address
	srv     *grpc.Server
	peerSrv *grpc.Server
	served  sync.WaitGroup
	killed  bool
}

// startTestGateway starts replica id of the cluster on te, with a lease
// of ttl. The test's cleanup closes it, unless kill did first.
func startTestGateway(t *testing.T, te *testEtcd, id string, ttl time.Duration) *testGateway {
	t.Helper()
	peerLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cli := te.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dir, err := Join(ctx, cli, Options{
		Cluster: "replicas", ReplicaID: id, Addr: peerLis.Addr().String(), TTL: ttl,
		ProbeInterval: 200 * time.Millisecond, Logger: testLogger(t).With("test_replica", id),
	})
	if err != nil {
		t.Fatal(err)
	}
	tg := &testGateway{dir: dir, addr: lis.Addr().String()}
	tg.peering = NewPeering(dir, grpc.WithTransportCredentials(insecure.NewCredentials()))
	tg.g, err = gateway.New(gateway.Options{Cluster: tg.peering, ClusterToken: testToken, Logger: testLogger(t).With("test_replica", id)})
	if err != nil {
		t.Fatal(err)
	}
	tg.srv = grpc.NewServer(tg.g.ServerOptions()...)
	tg.g.Register(tg.srv)
	tg.peerSrv = grpc.NewServer(tg.g.PeerServerOptions()...)
	tg.served.Add(2)
	go func() { defer tg.served.Done(); _ = tg.srv.Serve(lis) }()
	go func() { defer tg.served.Done(); _ = tg.peerSrv.Serve(peerLis) }()
	tg.callers, err = grpc.NewClient(tg.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = tg.callers.Close()
		if tg.killed {
			return
		}
		tg.srv.Stop()
		tg.peerSrv.Stop()
		tg.served.Wait()
		tg.peering.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = dir.Close(ctx)
	})
	return tg
}

// kill stops the replica as a crash would: its servers close at once and
// its lease is not revoked, so its entries stay in the directory until
// the lease expires.
func (tg *testGateway) kill() {
	tg.killed = true
	tg.srv.Stop()
	tg.peerSrv.Stop()
	tg.served.Wait()
	tg.peering.Close()
	// What a crash leaves: no keepalives, nothing revoked. Stopping the
	// directory's loops without Close keeps the lease as it is.
	tg.dir.cancel()
	tg.dir.wg.Wait()
}

// startTestAgent connects an agent with key and one tunnel to the replica,
// serving a test service, until the test ends.
func startTestAgent(t *testing.T, tg *testGateway, key string, target *grpc.ClientConn) {
	t.Helper()
	gw, err := grpc.NewClient(tg.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(gw, target, agent.Options{Key: key, Logger: testLogger(t), Reconnect: tunnel.ReconnectOptions{MaxBackoff: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(context.Background()) }()
	t.Cleanup(func() {
		a.Stop()
		<-done
		_ = gw.Close()
	})
}

func keyed(cc grpc.ClientConnInterface, key string) grpchantesting.TestServiceClient {
	return grpchantesting.NewTestServiceClient(testkit.Header{ClientConnInterface: cc, Key: gateway.DefaultKeyHeader, Value: key})
}

func startService(t *testing.T) *grpc.ClientConn {
	t.Helper()
	srv := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(srv, &grpchantesting.TestServer{})
	return loopback.Serve(t, srv)
}

// TestCallsCrossReplicas: three replicas on one etcd; an agent on replica
// 1 is called through replicas 2 and 3 with every kind of call, as soon
// as their directories show it; fan-out reaches agents on two replicas.
func TestCallsCrossReplicas(t *testing.T) {
	te := startEtcd(t)
	r1 := startTestGateway(t, te, "gw-1", 5*time.Second)
	r2 := startTestGateway(t, te, "gw-2", 5*time.Second)
	r3 := startTestGateway(t, te, "gw-3", 5*time.Second)
	service := startService(t)
	startTestAgent(t, r1, "site-a", service)
	startTestAgent(t, r3, "site-b", service)
	for _, r := range []*testGateway{r2, r3} {
		testkit.WaitFor(t, func() bool { return hasHolder(r.dir, "site-a", "gw-1") })
	}
	for _, r := range []*testGateway{r2, r3} {
		client := keyed(r.callers, "site-a")
		if err := testkit.CallEveryKind(context.Background(), client, []byte("across"), 3); err != nil {
			t.Errorf("through %s: %v", r.dir.Self().ID, err)
		}
	}
	testkit.WaitFor(t, func() bool { return hasHolder(r2.dir, "site-b", "gw-3") })
	agents := r2.g.Agents()
	if len(agents) != 0 {
		t.Errorf("replica 2 holds %v itself; want nothing", agents)
	}

	// A compressed call crosses replicas compressed and comes back so.
	payload := bytes.Repeat([]byte("compressible "), 1000)
	resp, err := keyed(r2.callers, "site-a").Unary(context.Background(), &grpchantesting.Message{Payload: payload}, grpc.UseCompressor(gzip.Name))
	if err != nil || !bytes.Equal(resp.GetPayload(), payload) {
		t.Errorf("a gzip call through replica 2: %v", err)
	}

	// A fan-out through replica 2 reaches the agents of replicas 1 and 3,
	// each result labelled with its agent.
	got := testkit.FanOut(t, r2.callers, gateway.DefaultKeyHeader, "site-a,site-b")
	if len(got) != 2 || got["site-a"] != "ping" || got["site-b"] != "ping" {
		t.Errorf("fan-out through replica 2 to agents on replicas 1 and 3: %v", got)
	}
}

// TestKilledReplica: an agent with tunnels on replicas 1 and 2 stays
// reachable through replica 3 while replica 1 dies without a word, and
// replica 1's entries leave every directory once its lease expires. Only
// the calls running through replica 1 when it died fail, with
// Unavailable: their requests may have reached the agent, so only their
// callers may repeat them.
func TestKilledReplica(t *testing.T) {
	const ttl = 2 * time.Second
	te := startEtcd(t)
	r1 := startTestGateway(t, te, "gw-1", ttl)
	r2 := startTestGateway(t, te, "gw-2", ttl)
	r3 := startTestGateway(t, te, "gw-3", ttl)
	service := startService(t)
	startTestAgent(t, r1, "site-a", service)
	startTestAgent(t, r2, "site-a", service)
	testkit.WaitFor(t, func() bool { return len(r3.dir.Holders("site-a", true)) == 2 })

	// Callers keep calling through replica 3 the whole time.
	const callers = 4
	var calls, failures atomic.Int64
	var firstErr, otherErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			client := keyed(r3.callers, "site-a")
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := client.Unary(ctx, &grpchantesting.Message{Payload: []byte("x")})
				cancel()
				calls.Add(1)
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					if status.Code(err) != codes.Unavailable {
						otherErr.CompareAndSwap(nil, err)
					}
				}
			}
		})
	}
	testkit.WaitFor(t, func() bool { return calls.Load() > 50 })
	r1.kill()
	killed := time.Now()
	before := calls.Load()
	testkit.WaitFor(t, func() bool { return calls.Load() > before+200 })
	// The entries of the dead replica expire with its lease.
	for _, r := range []*testGateway{r2, r3} {
		waitFor(t, r.dir, 4*ttl, "gw-1 expired", func() bool {
			return !hasHolder(r.dir, "site-a", "gw-1") && len(r.dir.Replicas()) == 2
		})
	}
	t.Logf("gw-1's entries expired %v after it died", time.Since(killed).Round(10*time.Millisecond))
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > callers {
		t.Errorf("%d of %d calls failed while a replica died, more than the %d that can have been running through it; first: %v", n, calls.Load(), callers, firstErr.Load())
	}
	if err := otherErr.Load(); err != nil {
		t.Errorf("a call failed with other than Unavailable: %v", err)
	}
	t.Logf("%d of %d calls failed, those running through the replica that died", failures.Load(), calls.Load())
}

// TestEtcdOutageUnderLoad: with etcd stopped, the replicas keep routing
// with the directory they last saw, and say they are out of touch; a
// tunnel that opens meanwhile is routed to by the other replicas once
// etcd is back. No call fails.
func TestEtcdOutageUnderLoad(t *testing.T) {
	te := startEtcd(t)
	r1 := startTestGateway(t, te, "gw-1", 5*time.Second)
	r2 := startTestGateway(t, te, "gw-2", 5*time.Second)
	r3 := startTestGateway(t, te, "gw-3", 5*time.Second)
	service := startService(t)
	startTestAgent(t, r1, "site-a", service)
	for _, r := range []*testGateway{r2, r3} {
		testkit.WaitFor(t, func() bool { return hasHolder(r.dir, "site-a", "gw-1") })
	}

	var calls, failures atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, r := range []*testGateway{r2, r3} {
		wg.Go(func() {
			client := keyed(r.callers, "site-a")
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, err := client.Unary(context.Background(), &grpchantesting.Message{Payload: []byte("x")})
				calls.Add(1)
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	testkit.WaitFor(t, func() bool { return calls.Load() > 50 })

	te.stop()
	for _, r := range []*testGateway{r1, r2, r3} {
		waitFor(t, r.dir, 10*time.Second, "the outage noticed", func() bool { ok, _ := r.dir.Healthy(); return !ok })
	}
	during := calls.Load()
	testkit.WaitFor(t, func() bool { return calls.Load() > during+200 })
	// A tunnel opened during the outage is known to its own replica only.
	startTestAgent(t, r3, "late", service)
	testkit.WaitFor(t, func() bool { return hasLocal(r3.g, "late") })
	if h := r3.dir.Holders("late", false); len(h) != 0 {
		t.Errorf("a tunnel opened while etcd is down is in the directory already: %v", h)
	}

	te.start()
	for _, r := range []*testGateway{r1, r2, r3} {
		waitFor(t, r.dir, 20*time.Second, "etcd back", func() bool { ok, _ := r.dir.Healthy(); return ok })
	}
	waitFor(t, r2.dir, 10*time.Second, "the late tunnel registered", func() bool { return hasHolder(r2.dir, "late", "gw-3") })
	if _, err := keyed(r2.callers, "late").Unary(context.Background(), &grpchantesting.Message{}); err != nil {
		t.Errorf("a call through replica 2 to the agent that connected to replica 3 during the outage: %v", err)
	}
	after := calls.Load()
	testkit.WaitFor(t, func() bool { return calls.Load() > after+100 })
	close(stop)
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Errorf("%d of %d calls failed across an etcd outage; first: %v", n, calls.Load(), firstErr.Load())
	}
	t.Logf("%d calls across an etcd outage, %d failed", calls.Load(), failures.Load())
}

// hasLocal reports whether g holds a tunnel of key itself.
func hasLocal(g *gateway.Gateway, key string) bool {
	for _, a := range g.Agents() {
		if a.GetKey() == key && len(a.GetTunnels()) > 0 {
			return true
		}
	}
	return false
}
