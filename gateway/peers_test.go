package gateway_test

import (
	"context"
	"maps"
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/replica"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// staticCluster is a cluster directory fixed by the test: which other
// replicas hold each key. The replicas' connections exist only once they
// are started, so holders are added afterwards, under a lock. It counts
// the tunnels its replica holds, as a directory would record them.
type staticCluster struct {
	self string

	mu      sync.Mutex
	holders map[string][]gateway.Peer
	held    map[string]int
}

func (c *staticCluster) Self() string { return c.self }

func (c *staticCluster) Hold(key string) func() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held == nil {
		c.held = make(map[string]int)
	}
	c.held[key]++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.held[key]--
		})
	}
}

func (c *staticCluster) heldBy(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held[key]
}

func (c *staticCluster) Holders(key string) []gateway.Peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.holders[key]
}

// Replicas is every replica that holds anything.
func (c *staticCluster) Replicas() []gateway.Peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var all []gateway.Peer
	for _, ps := range c.holders {
		for _, p := range ps {
			if !slices.ContainsFunc(all, func(q gateway.Peer) bool { return q.ID == p.ID }) {
				all = append(all, p)
			}
		}
	}
	return all
}

func (c *staticCluster) set(key string, holders ...gateway.Peer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.holders == nil {
		c.holders = make(map[string][]gateway.Peer)
	}
	c.holders[key] = holders
}

const clusterToken = "the-cluster-secret"

// testReplica is one gateway replica of a test cluster: its gateway, a
// connection to its callers' port, and one to its peer port, as the other
// replicas reach it.
type testReplica struct {
	g       *gateway.Gateway
	callers *grpc.ClientConn
	peer    gateway.Peer
	cluster *staticCluster
}

// startReplica starts a gateway that is replica id of the test cluster,
// serving callers and agents on one port and its peers on another.
func startReplica(t *testing.T, id string, opts gateway.Options) *testReplica {
	t.Helper()
	c := &staticCluster{self: id}
	opts.Cluster = c
	if opts.ClusterToken == "" {
		opts.ClusterToken = clusterToken
	}
	g, callers := startGateway(t, opts)
	return &testReplica{g: g, callers: callers, cluster: c, peer: gateway.Peer{ID: id, Conn: servePeerPort(t, g)}}
}

// servePeerPort serves g's peer port and returns a connection to it.
func servePeerPort(t *testing.T, g *gateway.Gateway) *grpc.ClientConn {
	t.Helper()
	return loopback.Serve(t, grpc.NewServer(g.PeerServerOptions()...))
}

// downConn is a connection to an address nothing listens on.
func downConn(t *testing.T) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// A caller of one replica reaches an agent connected to another, through
// both gateways, with every kind of call, its metadata, trailers, status
// details and deadline intact; the agent sees neither the key header nor
// the peer header.
func TestCallReachesAgentOnAnotherReplica(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	startAgent(t, r1.g, r1.callers, startBackend(t), "site-a", 1)
	r2.cluster.set("site-a", r1.peer)

	conn := keyed(r2.callers, "site-a")
	grpchantesting.RunChannelTestCases(t, conn, true)
	client := grpchantesting.NewTestServiceClient(conn)
	if err := testkit.CallEveryKind(context.Background(), client, []byte("payload"), 3); err != nil {
		t.Fatal(err)
	}

	ctx := metadata.AppendToOutgoingContext(context.Background(), "kept", "yes")
	resp, err := client.Unary(ctx, &grpchantesting.Message{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{gateway.DefaultKeyHeader, gateway.PeerHeader} {
		if _, ok := resp.GetHeaders()[h]; ok {
			t.Errorf("the agent's service saw the %s header", h)
		}
	}
	if resp.GetHeaders()["kept"] == nil {
		t.Errorf("the agent's service did not see the caller's headers: %v", resp.GetHeaders())
	}

	// The caller's deadline ends the call on every hop: the service
	// waits for a request that never comes until it does (goleak would
	// see its handler otherwise).
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	bidi, err := client.BidiStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bidi.Recv(); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a call past its deadline: %v, want DeadlineExceeded", err)
	}
}

// A forwarded call reaches a replica whose tunnel has just gone (its
// sender's view is stale): it goes on, once, to a replica that holds one.
func TestForwardedCallFollowsAMovedTunnel(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	r3 := startReplica(t, "gw-3", gateway.Options{})
	startAgent(t, r3.g, r3.callers, startBackend(t), "moved", 1)
	r1.cluster.set("moved", r2.peer) // stale: r2's tunnel has gone to r3
	r2.cluster.set("moved", r3.peer)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := grpchantesting.NewTestServiceClient(keyed(r1.callers, "moved")).Unary(ctx, &grpchantesting.Message{Payload: []byte("here")})
	if err != nil || string(resp.GetPayload()) != "here" {
		t.Fatalf("a call forwarded to a replica whose tunnel moved on: %v, %v; want it served by the replica that holds it", resp, err)
	}
	if _, ok := resp.GetHeaders()[gateway.PeerHeader]; ok {
		t.Error("the agent's service saw the peer header")
	}
}

// A call crosses at most two hops between replicas: when the directories
// disagree (each replica thinks the other holds the agent), the call fails
// instead of bouncing between them.
func TestForwardedCallHopsAtMostTwice(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	r1.cluster.set("loop", r2.peer)
	r2.cluster.set("loop", r1.peer)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := grpchantesting.NewTestServiceClient(keyed(r2.callers, "loop")).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `no agent is connected with tunnel-key "loop"`) {
		t.Errorf("a call whose replicas point at each other: %v; want Unavailable, no agent connected", err)
	}
}

// Only a replica of the cluster may send the peer header, which skips
// authorization, and only to the peer port: a wrong token, any token where
// none is configured, the header on the callers' port and a call without
// it on the peer port are all refused with PermissionDenied, counted and
// logged as a bad token.
func TestPeerHeaderNeedsTheClusterToken(t *testing.T) {
	reg := prometheus.NewRegistry()
	var log testkit.JSONLog
	r1 := startReplica(t, "gw-1", gateway.Options{Registerer: reg, Logger: log.Logger()})
	startAgent(t, r1.g, r1.callers, startBackend(t), "site-a", 1)
	g2, gw2 := startGateway(t, gateway.Options{}) // no cluster token
	startAgent(t, g2, gw2, startBackend(t), "site-a", 1)
	peerPort2 := servePeerPort(t, g2)

	for _, c := range []struct {
		name, token string
		conn        *grpc.ClientConn
		want        string
	}{
		{"wrong token", "not-" + clusterToken, r1.peer.Conn.(*grpc.ClientConn), "not a replica of this cluster"},
		{"empty token", "", r1.peer.Conn.(*grpc.ClientConn), "not a replica of this cluster"},
		{"the right token on the callers' port", clusterToken, r1.callers, "not a replica of this cluster"},
		{"a caller on the peer port", "", r1.peer.Conn.(*grpc.ClientConn), "this is a peer port"},
		{"no cluster token configured", clusterToken, peerPort2, "not a replica of this cluster"},
	} {
		ctx := context.Background()
		if c.want != "this is a peer port" {
			ctx = metadata.AppendToOutgoingContext(ctx, gateway.PeerHeader, c.token)
		}
		_, err := grpchantesting.NewTestServiceClient(keyed(c.conn, "site-a")).Unary(ctx, &grpchantesting.Message{})
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "grpctunnel gateway: "+c.want) {
			t.Errorf("%s: %v; want PermissionDenied, %s", c.name, err, c.want)
		}
	}
	if n := samples(t, reg)[refused("caller", gateway.ReasonBadToken)]; n != 4 {
		t.Errorf("refused callers with a bad token: %v, want 4", n)
	}
	if !logged(t, &log, "caller refused", gateway.ReasonBadToken) {
		t.Errorf("no refusal logged: %s", log.String())
	}

	// The right token on the peer port goes through.
	ctx := metadata.AppendToOutgoingContext(context.Background(), gateway.PeerHeader, clusterToken)
	if _, err := grpchantesting.NewTestServiceClient(keyed(r1.peer.Conn, "site-a")).Unary(ctx, &grpchantesting.Message{}); err != nil {
		t.Errorf("a call with the cluster's token: %v", err)
	}
}

// AuthorizeCall runs on the replica the caller reached, not again on the
// replica that holds the agent.
func TestCallIsAuthorizedOnTheFirstReplicaOnly(t *testing.T) {
	var first, second atomic.Int64
	r1 := startReplica(t, "gw-1", gateway.Options{
		AuthorizeCall: func(context.Context, string, []string) error {
			second.Add(1)
			return status.Error(codes.PermissionDenied, "the holding replica authorized the call")
		},
	})
	allow := atomic.Bool{}
	r2 := startReplica(t, "gw-2", gateway.Options{
		AuthorizeCall: func(context.Context, string, []string) error {
			first.Add(1)
			if !allow.Load() {
				return status.Error(codes.PermissionDenied, "refused by the first replica")
			}
			return nil
		},
	})
	startAgent(t, r1.g, r1.callers, startBackend(t), "site-a", 1)
	r2.cluster.set("site-a", r1.peer)
	client := grpchantesting.NewTestServiceClient(keyed(r2.callers, "site-a"))

	_, err := client.Unary(context.Background(), &grpchantesting.Message{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "refused by the first replica") {
		t.Errorf("a call the first replica refuses: %v", err)
	}
	allow.Store(true)
	if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
		t.Errorf("a call the first replica allows: %v", err)
	}
	if first.Load() != 2 || second.Load() != 0 {
		t.Errorf("AuthorizeCall ran %d times on the first replica and %d on the second; want 2 and 0", first.Load(), second.Load())
	}
}

// A holder that cannot be reached is named in the caller's error; when
// another holder can take the call, it does. Each is counted.
func TestUnreachableReplicaIsNamed(t *testing.T) {
	reg := prometheus.NewRegistry()
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{Registerer: reg})
	startAgent(t, r1.g, r1.callers, startBackend(t), "site-a", 1)
	down := gateway.Peer{ID: "gw-b", Conn: downConn(t)}
	client := grpchantesting.NewTestServiceClient(keyed(r2.callers, "site-a"))

	r2.cluster.set("site-a", down)
	_, err := client.Unary(context.Background(), &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `grpctunnel gateway: replica gw-b holding agent "site-a" is unreachable: `) {
		t.Errorf("a call whose only holder is down: %v; want Unavailable naming gw-b", err)
	}

	// Two calls: each starts at a different holder, so one of them
	// meets the one that is down first.
	r2.cluster.set("site-a", down, r1.peer)
	for range 2 {
		if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
			t.Errorf("a call with one holder down and one up: %v", err)
		}
	}
	got := samples(t, reg)
	for result, want := range map[string]float64{"forwarded": 2, "holder_unreachable": 2, "failed": 1} {
		if n := got[`grpctunnel_gateway_forwarded_total{result="`+result+`"}`]; n != want {
			t.Errorf("forwarded calls with result %s: %v, want %v", result, n, want)
		}
	}
}

// A fan-out names agents held by different replicas: each result comes
// from its own agent, labelled with its key, whichever replica holds it.
func TestFanOutAcrossReplicas(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	backend := startBackend(t)
	startAgent(t, r1.g, r1.callers, backend, "a", 1)
	startAgent(t, r2.g, r2.callers, backend, "b", 1)
	r2.cluster.set("a", r1.peer)

	got := testkit.FanOut(t, r2.callers, gateway.DefaultKeyHeader, "a,b", "gone")
	if want := map[string]string{"a": "ping", "b": "ping", "gone": "Unavailable"}; !maps.Equal(got, want) {
		t.Errorf("results %v, want %v", got, want)
	}
}

// A replica tells its cluster of each tunnel it opens and closes, and
// names itself to the agent in the response header of each tunnel.
func TestReplicaHoldsItsTunnels(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), gateway.DefaultKeyHeader, "site-a"))
	defer cancel()
	stream, err := tunnelpb.NewTunnelServiceClient(r1.callers).OpenReverseTunnel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	header, err := stream.Header()
	if err != nil {
		t.Fatal(err)
	}
	if got := header.Get(replica.Header); len(got) != 1 || got[0] != "gw-1" {
		t.Errorf("replica header of the tunnel: %v, want gw-1", got)
	}
	testkit.WaitFor(t, func() bool { return r1.cluster.heldBy("site-a") == 1 })
	cancel()
	testkit.WaitFor(t, func() bool { return r1.cluster.heldBy("site-a") == 0 })

	// A gateway alone names no replica.
	_, gw := startGateway(t, gateway.Options{})
	ctx2, cancel2 := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), gateway.DefaultKeyHeader, "site-a"))
	defer cancel2()
	stream, err = tunnelpb.NewTunnelServiceClient(gw).OpenReverseTunnel(ctx2)
	if err != nil {
		t.Fatal(err)
	}
	if header, err = stream.Header(); err != nil || len(header.Get(replica.Header)) != 0 {
		t.Errorf("a gateway alone: header %v, err %v; want no replica header", header, err)
	}
}

// ListAgents on any replica lists the agents of the whole cluster, each
// tunnel with the replica that holds it, and names a replica that did not
// answer.
func TestListAgentsCoversTheCluster(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	backend := startBackend(t)
	startAgent(t, r1.g, r1.callers, backend, "a", 1)
	startAgent(t, r2.g, r2.callers, backend, "a", 1)
	startAgent(t, r2.g, r2.callers, backend, "b", 1)
	r1.cluster.set("b", r2.peer)

	resp, err := adminpb.NewAdminServiceClient(r1.callers).ListAgents(context.Background(), &adminpb.ListAgentsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range resp.GetAgents() {
		for _, tn := range a.GetTunnels() {
			got = append(got, a.GetKey()+"@"+tn.GetReplica())
		}
	}
	slices.Sort(got)
	if want := []string{"a@gw-1", "a@gw-2", "b@gw-2"}; !slices.Equal(got, want) {
		t.Errorf("ListAgents on gw-1: %v, want %v", got, want)
	}
	if len(resp.GetUnreachableReplicas()) != 0 {
		t.Errorf("unreachable replicas: %v", resp.GetUnreachableReplicas())
	}

	r1.cluster.set("c", gateway.Peer{ID: "gw-down", Conn: downConn(t)})
	resp, err = adminpb.NewAdminServiceClient(r1.callers).ListAgents(context.Background(), &adminpb.ListAgentsRequest{Key: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.GetAgents()); n != 1 || len(resp.GetAgents()[0].GetTunnels()) != 2 {
		t.Errorf("ListAgents for key a: %v, want one agent with two tunnels", resp.GetAgents())
	}
	if u := resp.GetUnreachableReplicas(); len(u) != 1 || u[0].GetReplica() != "gw-down" || u[0].GetError() == "" {
		t.Errorf("unreachable replicas: %v, want gw-down with its error", u)
	}
}

// The dashboard of a replica shows the agents of the whole cluster, each
// tunnel with its replica, and names a replica that did not answer.
func TestDashboardShowsTheCluster(t *testing.T) {
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	backend := startBackend(t)
	startAgent(t, r1.g, r1.callers, backend, "a", 1)
	startAgent(t, r2.g, r2.callers, backend, "b", 1)
	r1.cluster.set("b", r2.peer)

	st := getState(t, r1.g.DashboardHandler())
	var got []string
	for _, a := range st.Agents {
		for _, tn := range a.Tunnels {
			got = append(got, a.Key+"@"+tn.Replica)
		}
	}
	if want := []string{"a@gw-1", "b@gw-2"}; !slices.Equal(got, want) || st.Replica != "gw-1" || len(st.Unreachable) != 0 {
		t.Errorf("dashboard of gw-1: tunnels %v, replica %q, unreachable %v; want %v, gw-1, none", got, st.Replica, st.Unreachable, want)
	}

	r1.cluster.set("c", gateway.Peer{ID: "gw-down", Conn: downConn(t)})
	st = getState(t, r1.g.DashboardHandler())
	if st.Unreachable["gw-down"] == "" {
		t.Errorf("dashboard with a replica down: unreachable %v, want gw-down named", st.Unreachable)
	}

	// A gateway alone names no replica.
	g, _ := startGateway(t, gateway.Options{})
	if st := getState(t, g.DashboardHandler()); st.Replica != "" || st.Unreachable != nil {
		t.Errorf("dashboard of a gateway alone: replica %q, unreachable %v", st.Replica, st.Unreachable)
	}
}

// The cluster's token can change while replicas run (ClusterTokens): a
// replica sends the first of its tokens and accepts any, so the cluster
// moves to a new token with no call refused, after which the old token
// is refused.
func TestClusterTokenRotation(t *testing.T) {
	var tokens1, tokens2 atomic.Pointer[[]string]
	set := func(p *atomic.Pointer[[]string], tokens ...string) { p.Store(&tokens) }
	set(&tokens1, "old")
	set(&tokens2, "old")
	r1 := startReplica(t, "gw-1", gateway.Options{ClusterTokens: func() []string { return *tokens1.Load() }})
	r2 := startReplica(t, "gw-2", gateway.Options{ClusterTokens: func() []string { return *tokens2.Load() }})
	startAgent(t, r1.g, r1.callers, startBackend(t), "site-a", 1)
	r2.cluster.set("site-a", r1.peer)
	client := grpchantesting.NewTestServiceClient(keyed(r2.callers, "site-a"))
	call := func(step string) {
		t.Helper()
		if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
			t.Errorf("%s: a call across replicas: %v", step, err)
		}
	}

	call("both on the old token")
	set(&tokens1, "old", "new")
	set(&tokens2, "old", "new")
	call("the new token accepted everywhere")
	set(&tokens2, "new", "old")
	call("replica 2 sends the new token")
	set(&tokens1, "new")
	set(&tokens2, "new")
	call("the old token gone")

	ctx := metadata.AppendToOutgoingContext(context.Background(), gateway.PeerHeader, "old")
	_, err := grpchantesting.NewTestServiceClient(keyed(r1.peer.Conn, "site-a")).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("the old token after the rotation: %v, want PermissionDenied", err)
	}
}
