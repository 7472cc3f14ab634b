package agent_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/replica"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// replicaServer is a minimal gateway replica: a tunnel handler that keys
// reverse tunnels by the agent's tunnel-key and, unless its id is empty,
// names itself in the tunnels' response header, as a replica of a gateway
// cluster does.
type replicaServer struct {
	id      string
	handler *tunnel.TunnelServiceHandler
	srv     *grpc.Server
	addrs   []string
	opened  atomic.Int32 // opening RPCs it took, for tunnels given back too
	serving sync.WaitGroup
	stopped sync.Once
}

// newReplica returns a replica listening on n loopback addresses, which
// it serves once serve is called. Listening first lets a test give an
// agent the address of a replica that is not up yet: the agent's
// connection to it waits, as one to a replica still starting.
func newReplica(t *testing.T, id string, n int) (*replicaServer, []net.Listener) {
	t.Helper()
	r := &replicaServer{id: id}
	r.handler = tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		AffinityKey: func(ch tunnel.TunnelChannel) any {
			md, _ := metadata.FromIncomingContext(ch.Context())
			return md.Get(agent.DefaultKeyHeader)[0]
		},
	})
	r.srv = grpc.NewServer(grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		// Counted before the agent can see the tunnel open.
		r.opened.Add(1)
		if r.id != "" {
			if err := grpc.SetHeader(ss.Context(), metadata.Pairs(replica.Header, r.id)); err != nil {
				return err
			}
		}
		return next(srv, ss)
	}))
	tunnelpb.RegisterTunnelServiceServer(r.srv, r.handler.Service())
	var liss []net.Listener
	for range n {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		liss = append(liss, lis)
		r.addrs = append(r.addrs, lis.Addr().String())
	}
	t.Cleanup(func() {
		r.stop()
		for _, lis := range liss {
			lis.Close() // never served, if the test did not get that far
		}
	})
	return r, liss
}

// startReplica serves a new replica on one loopback address.
func startReplica(t *testing.T, id string) *replicaServer {
	t.Helper()
	r, liss := newReplica(t, id, 1)
	r.serve(liss...)
	return r
}

func (r *replicaServer) serve(liss ...net.Listener) {
	for _, lis := range liss {
		r.serving.Go(func() { _ = r.srv.Serve(lis) })
	}
}

// stop ends the replica at once, as a crash would: its tunnels are cut.
func (r *replicaServer) stop() {
	r.stopped.Do(func() {
		r.srv.Stop()
		r.serving.Wait()
	})
}

// tunnels is how many tunnels of key the replica holds.
func (r *replicaServer) tunnels() int { return len(r.handler.AllReverseTunnels()) }

// call makes a call to the agent with key k through this replica.
func (r *replicaServer) call(t *testing.T) error {
	t.Helper()
	_, err := grpchantesting.NewTestServiceClient(r.handler.KeyAsChannel("k")).Unary(t.Context(), &grpchantesting.Message{})
	return err
}

// runningAgent is an agent of key "k" whose Run is in progress until the
// test ends; it counts the tunnels it gave back.
type runningAgent struct {
	*agent.Agent
	logs      *testkit.JSONLog
	reg       *prometheus.Registry
	givenBack atomic.Int32

	mu       sync.Mutex
	onChange func(tunnel.StateChange) // set by a test, if it wants them
}

// watch has f told of every state change from now on.
func (ra *runningAgent) watch(f func(tunnel.StateChange)) {
	ra.mu.Lock()
	ra.onChange = f
	ra.mu.Unlock()
}

// runAgent runs an agent with key "k" and tunnels tunnels over a gateway
// client for addrs, dialled with agent.DialGateway, in front of a test
// service.
func runAgent(t *testing.T, addrs []string, tunnels int, maxBackoff time.Duration) *runningAgent {
	t.Helper()
	target := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(target, &grpchantesting.TestServer{})
	targetConn := loopback.Serve(t, target)
	conn, err := agent.DialGateway(addrs, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ra := &runningAgent{logs: &testkit.JSONLog{}, reg: prometheus.NewRegistry()}
	a, err := agent.New(conn, targetConn, agent.Options{
		Key: "k", GatewayAddresses: len(addrs), Logger: ra.logs.Logger(), Registerer: ra.reg,
		Reconnect: tunnel.ReconnectOptions{
			Tunnels: tunnels, MaxBackoff: maxBackoff,
			OnStateChange: func(c tunnel.StateChange) {
				if c.State == tunnel.TunnelWaiting && errors.Is(c.Err, tunnel.ErrGivenBack) {
					ra.givenBack.Add(1)
				}
				ra.mu.Lock()
				f := ra.onChange
				ra.mu.Unlock()
				if f != nil {
					f(c)
				}
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ra.Agent = a
	ran := make(chan error, 1)
	go func() { ran <- a.Run(context.Background()) }()
	t.Cleanup(func() {
		a.Stop()
		if err := <-ran; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return ra
}

// spreadOver reports whether the agent has n tunnels open, each on
// another of the replicas wanted, and the replicas agree.
func (ra *runningAgent) spreadOver(n int, wanted ...*replicaServer) bool {
	h := ra.Health()
	if h.TunnelsOpen != n || len(h.Replicas) != n {
		return false
	}
	holding := 0
	for _, r := range wanted {
		switch got := r.tunnels(); {
		case got > 1:
			return false
		case got == 1:
			if !slices.Contains(h.Replicas, r.id) {
				return false
			}
			holding++
		}
	}
	return holding == n
}

// TestTunnelsSpreadOverReplicas gives an agent with two tunnels the
// addresses of three gateway replicas: its tunnels end up on two of them,
// and when one of those dies the agent is still reachable through the
// other at once, and its lost tunnel reopens on the third, not beside the
// one left.
func TestTunnelsSpreadOverReplicas(t *testing.T) {
	replicas := []*replicaServer{startReplica(t, "r1"), startReplica(t, "r2"), startReplica(t, "r3")}
	var addrs []string
	for _, r := range replicas {
		addrs = append(addrs, r.addrs...)
	}
	ra := runAgent(t, addrs, 2, 0)
	waitFor(t, func() bool { return ra.spreadOver(2, replicas...) })
	if v := metricValue(t, ra.reg, "grpctunnel_agent_gateway_replicas"); v != 2 {
		t.Errorf("grpctunnel_agent_gateway_replicas = %v, want 2", v)
	}
	if v := metricValue(t, ra.reg, "grpctunnel_agent_tunnels_given_back_total"); v != float64(ra.givenBack.Load()) {
		t.Errorf("grpctunnel_agent_tunnels_given_back_total = %v; %d given back", v, ra.givenBack.Load())
	}
	for _, rec := range ra.logs.Records(t, "tunnel open") {
		if id, _ := rec["replica"].(string); id == "" {
			t.Errorf("a tunnel open line names no replica: %v", rec)
		}
	}

	// The first replica holding a tunnel dies.
	var lost, kept, spare *replicaServer
	for _, r := range replicas {
		switch {
		case r.tunnels() == 0:
			spare = r
		case lost == nil:
			lost = r
		default:
			kept = r
		}
	}
	lost.stop()
	if err := kept.call(t); err != nil {
		t.Fatalf("a call through %s, which holds the other tunnel, once %s died: %v", kept.id, lost.id, err)
	}
	waitFor(t, func() bool { return ra.spreadOver(2, kept, spare) })
	if err := spare.call(t); err != nil {
		t.Fatalf("a call through %s, which took the lost tunnel: %v", spare.id, err)
	}
	t.Logf("%d tunnels given back in all", ra.givenBack.Load())
}

// TestNoSpreadingWithoutReplicas: gateways that name no replica are not a
// cluster; whichever of them the tunnels land on, none is given back.
func TestNoSpreadingWithoutReplicas(t *testing.T) {
	replicas := []*replicaServer{startReplica(t, ""), startReplica(t, ""), startReplica(t, "")}
	var addrs []string
	for _, r := range replicas {
		addrs = append(addrs, r.addrs...)
	}
	ra := runAgent(t, addrs, 3, 0)
	waitFor(t, func() bool {
		held := 0
		for _, r := range replicas {
			held += r.tunnels()
		}
		return held == 3 && ra.Health().TunnelsOpen == 3
	})
	opened := 0
	for _, r := range replicas {
		opened += int(r.opened.Load())
		if err := r.call(t); r.tunnels() > 0 && err != nil {
			t.Errorf("a call through a gateway holding a tunnel: %v", err)
		}
	}
	if n := ra.givenBack.Load(); n != 0 || opened != 3 {
		t.Errorf("%d tunnels given back, %d opened; want none given back, 3 opened", n, opened)
	}
	if h := ra.Health(); len(h.Replicas) != 0 {
		t.Errorf("health names replicas of gateways that named none: %+v", h)
	}
	for _, rec := range ra.logs.Records(t, "tunnel open") {
		if _, ok := rec["replica"]; ok {
			t.Errorf("a tunnel open line names a replica: %v", rec)
		}
	}
}

// TestOneAddressOneReplica: an agent given one address keeps its tunnels
// on the one replica behind it, without giving any back.
func TestOneAddressOneReplica(t *testing.T) {
	r := startReplica(t, "r1")
	ra := runAgent(t, r.addrs, 2, 0)
	waitFor(t, func() bool { return r.tunnels() == 2 && ra.Health().TunnelsOpen == 2 })
	if err := r.call(t); err != nil {
		t.Fatal(err)
	}
	if h := ra.Health(); !slices.Equal(h.Replicas, []string{"r1"}) {
		t.Errorf("health %+v; want replicas [r1]", h)
	}
	if n := ra.givenBack.Load(); n != 0 || r.opened.Load() != 2 {
		t.Errorf("%d tunnels given back, %d opened; want none given back, 2 opened", n, r.opened.Load())
	}
}

// TestSpreadingGivesUpOnOneReplica: an agent given two addresses that
// lead to the same replica gives its second tunnel back a few times, then
// keeps it there, and tries again later, each time after twice as long:
// no loop, however long nothing else is up.
func TestSpreadingGivesUpOnOneReplica(t *testing.T) {
	r, liss := newReplica(t, "r1", 2)
	r.serve(liss...)
	const later = 200 * time.Millisecond
	ra := runAgent(t, r.addrs, 2, later)
	waitFor(t, func() bool { return r.tunnels() == 2 && ra.Health().TunnelsOpen == 2 })
	if err := r.call(t); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		return len(ra.logs.Records(t, "tunnel kept on a gateway replica that holds another: no other replica took it; trying again later")) >= 2
	})

	// Read the story from the log, in order: three refusals, kept, the
	// later try gives one back, three refusals, kept.
	var story []string
	var waits []string
	for _, line := range jsonLines(t, ra.logs) {
		switch line["msg"] {
		case "tunnel given back to spread over gateway replicas; reopening":
			story = append(story, "back")
		case "tunnel kept on a gateway replica that holds another: no other replica took it; trying again later":
			story = append(story, "kept")
			w, _ := line["retry_in"].(string)
			waits = append(waits, w)
		}
	}
	want := []string{"back", "back", "back", "kept", "back", "back", "back", "back", "kept"}
	if len(story) < len(want) || !slices.Equal(story[:len(want)], want) {
		t.Fatalf("the agent's story: %v; want it to start %v; the log:\n%s", story, want, ra.logs.String())
	}
	if waits[0] != later.String() || waits[1] != (2*later).String() {
		t.Errorf("later tries after %v; want %v, then %v", waits, later, 2*later)
	}
}

// TestSpreadingMovesATunnelLater: an agent whose tunnels all landed on the
// one replica that was up, of the three it was given, moves one to
// another replica once that one is up, draining it rather than cutting it.
func TestSpreadingMovesATunnelLater(t *testing.T) {
	up := startReplica(t, "r1")
	late, lateLis := newReplica(t, "r2", 1)
	never, _ := newReplica(t, "r3", 1)
	addrs := slices.Concat(up.addrs, late.addrs, never.addrs)
	ra := runAgent(t, addrs, 2, 100*time.Millisecond)
	waitFor(t, func() bool { return up.tunnels() == 2 && ra.Health().TunnelsOpen == 2 })
	late.serve(lateLis...)
	waitFor(t, func() bool { return ra.spreadOver(2, up, late) })
	if err := late.call(t); err != nil {
		t.Fatal(err)
	}
}

// jsonLines is every record logs holds, in the order they were written.
func jsonLines(t *testing.T, logs *testkit.JSONLog) []map[string]any {
	t.Helper()
	var recs []map[string]any
	sc := bufio.NewScanner(strings.NewReader(logs.String()))
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("a log line is not JSON: %v: %s", err, sc.Text())
		}
		recs = append(recs, rec)
	}
	return recs
}

// drain stops the replica as a gateway does on SIGTERM: its tunnels are
// drained and new ones refused until it stops listening.
func (r *replicaServer) drain() {
	r.stopped.Do(func() {
		r.handler.InitiateShutdown()
		r.srv.GracefulStop()
		r.serving.Wait()
	})
}

// TestBackAfterEveryReplicaRestarts drains both replicas an agent was
// given and lets it fail to reach either for a while; then one comes back
// at its address, and the agent is back on it within a fraction of a
// second: round-robin over a list of addresses leaves the connection idle
// between attempts (agent.IdleTimeout), so gRPC's own backoff, which has
// grown to seconds by then, does not hold the agent back.
func TestBackAfterEveryReplicaRestarts(t *testing.T) {
	r1, r2 := startReplica(t, "r1"), startReplica(t, "r2")
	ra := runAgent(t, slices.Concat(r1.addrs, r2.addrs), 2, 0)
	var mu sync.Mutex
	var first, last time.Time // of the failures
	ra.watch(func(c tunnel.StateChange) {
		if c.State == tunnel.TunnelWaiting && c.Err != nil && !errors.Is(c.Err, tunnel.ErrGivenBack) {
			mu.Lock()
			if first.IsZero() {
				first = time.Now()
			}
			last = time.Now()
			mu.Unlock()
		}
	})
	waitFor(t, func() bool { return ra.spreadOver(2, r1, r2) })
	r1.drain()
	r2.drain()
	// gRPC's backoff starts at a second and grows 1.6 times a failure: let
	// the agent fail for three seconds.
	waitFor(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !first.IsZero() && last.Sub(first) >= 3*time.Second
	})

	lis, err := net.Listen("tcp", r1.addrs[0])
	if err != nil {
		t.Skipf("the replica's port was taken meanwhile: %v", err)
	}
	back, _ := newReplica(t, "r1-restarted", 0)
	back.addrs = r1.addrs
	back.serve(lis)
	listening := time.Now()
	waitFor(t, func() bool { return back.tunnels() >= 1 })
	took := time.Since(listening)
	t.Logf("back %v after the replica listened again", took)
	// The agent tries again within 400ms; the rest is slack for a slow
	// machine. gRPC's backoff would hold it back for seconds.
	if took > 1500*time.Millisecond {
		t.Errorf("the agent was back %v after the replica listened again", took)
	}
	if err := back.call(t); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return back.tunnels() == 2 && ra.Health().TunnelsOpen == 2 })
}
