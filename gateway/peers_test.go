package gateway_test

import (
	"context"
	"net"
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
	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

// staticPeers is a cluster directory fixed by the test: which other
// replicas hold each key. The replicas' connections exist only once they
// are started, so holders are added afterwards, under a lock.
type staticPeers struct {
	mu      sync.Mutex
	holders map[string][]gateway.Peer
}

func (p *staticPeers) Holders(key string) []gateway.Peer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.holders[key]
}

func (p *staticPeers) set(key string, holders ...gateway.Peer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.holders == nil {
		p.holders = make(map[string][]gateway.Peer)
	}
	p.holders[key] = holders
}

const clusterToken = "the-cluster-secret"

// startReplica starts a gateway that is a replica of the test cluster,
// with peers as its directory.
func startReplica(t *testing.T, peers *staticPeers, opts gateway.Options) (*gateway.Gateway, *grpc.ClientConn) {
	t.Helper()
	opts.Peers = peers
	opts.ClusterToken = clusterToken
	return startGateway(t, opts)
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
	var peers1, peers2 staticPeers
	g1, gw1 := startReplica(t, &peers1, gateway.Options{})
	_, gw2 := startReplica(t, &peers2, gateway.Options{})
	startAgent(t, g1, gw1, startBackend(t), "site-a", 1)
	peers2.set("site-a", gateway.Peer{ID: "gw-1", Conn: gw1})

	conn := keyed(gw2, "site-a")
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

// A call another replica forwarded is routed locally only: when the
// directories disagree (each replica thinks the other holds the agent),
// the call fails at the second replica instead of bouncing between them.
func TestForwardedCallIsNotForwardedAgain(t *testing.T) {
	var peers1, peers2 staticPeers
	_, gw1 := startReplica(t, &peers1, gateway.Options{})
	_, gw2 := startReplica(t, &peers2, gateway.Options{})
	peers1.set("loop", gateway.Peer{ID: "gw-2", Conn: gw2})
	peers2.set("loop", gateway.Peer{ID: "gw-1", Conn: gw1})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := grpchantesting.NewTestServiceClient(keyed(gw2, "loop")).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `no agent is connected with tunnel-key "loop"`) {
		t.Errorf("a call whose replicas point at each other: %v; want Unavailable, no agent connected", err)
	}
}

// Only a replica of the cluster may send the peer header, which skips
// authorization: a wrong token, or any token where none is configured, is
// refused with PermissionDenied, counted and logged as a bad token.
func TestPeerHeaderNeedsTheClusterToken(t *testing.T) {
	reg := prometheus.NewRegistry()
	var log testkit.JSONLog
	var peers staticPeers
	g1, gw1 := startReplica(t, &peers, gateway.Options{Registerer: reg, Logger: log.Logger()})
	startAgent(t, g1, gw1, startBackend(t), "site-a", 1)
	g2, gw2 := startGateway(t, gateway.Options{}) // no cluster token
	startAgent(t, g2, gw2, startBackend(t), "site-a", 1)

	for _, c := range []struct {
		name, token string
		conn        *grpc.ClientConn
	}{
		{"wrong token", "not-" + clusterToken, gw1},
		{"empty token", "", gw1},
		{"no cluster token configured", clusterToken, gw2},
	} {
		ctx := metadata.AppendToOutgoingContext(context.Background(), gateway.PeerHeader, c.token)
		_, err := grpchantesting.NewTestServiceClient(keyed(c.conn, "site-a")).Unary(ctx, &grpchantesting.Message{})
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "grpctunnel gateway: not a replica of this cluster") {
			t.Errorf("%s: %v; want PermissionDenied, not a replica", c.name, err)
		}
	}
	if n := samples(t, reg)[refused("caller", gateway.ReasonBadToken)]; n != 2 {
		t.Errorf("refused callers with a bad token: %v, want 2", n)
	}
	if !logged(t, &log, "caller refused", gateway.ReasonBadToken) {
		t.Errorf("no refusal logged: %s", log.String())
	}

	// The right token goes through.
	ctx := metadata.AppendToOutgoingContext(context.Background(), gateway.PeerHeader, clusterToken)
	if _, err := grpchantesting.NewTestServiceClient(keyed(gw1, "site-a")).Unary(ctx, &grpchantesting.Message{}); err != nil {
		t.Errorf("a call with the cluster's token: %v", err)
	}
}

// AuthorizeCall runs on the replica the caller reached, not again on the
// replica that holds the agent.
func TestCallIsAuthorizedOnTheFirstReplicaOnly(t *testing.T) {
	var first, second atomic.Int64
	var peers1, peers2 staticPeers
	g1, gw1 := startReplica(t, &peers1, gateway.Options{
		AuthorizeCall: func(context.Context, string, []string) error {
			second.Add(1)
			return status.Error(codes.PermissionDenied, "the holding replica authorized the call")
		},
	})
	allow := atomic.Bool{}
	_, gw2 := startReplica(t, &peers2, gateway.Options{
		AuthorizeCall: func(context.Context, string, []string) error {
			first.Add(1)
			if !allow.Load() {
				return status.Error(codes.PermissionDenied, "refused by the first replica")
			}
			return nil
		},
	})
	startAgent(t, g1, gw1, startBackend(t), "site-a", 1)
	peers2.set("site-a", gateway.Peer{ID: "gw-1", Conn: gw1})
	client := grpchantesting.NewTestServiceClient(keyed(gw2, "site-a"))

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
// another holder can take the call, it does.
func TestUnreachableReplicaIsNamed(t *testing.T) {
	var peers1, peers2 staticPeers
	g1, gw1 := startReplica(t, &peers1, gateway.Options{})
	_, gw2 := startReplica(t, &peers2, gateway.Options{})
	startAgent(t, g1, gw1, startBackend(t), "site-a", 1)
	down := gateway.Peer{ID: "gw-b", Conn: downConn(t)}
	client := grpchantesting.NewTestServiceClient(keyed(gw2, "site-a"))

	peers2.set("site-a", down)
	_, err := client.Unary(context.Background(), &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `grpctunnel gateway: replica gw-b holding agent "site-a" is unreachable: `) {
		t.Errorf("a call whose only holder is down: %v; want Unavailable naming gw-b", err)
	}

	peers2.set("site-a", down, gateway.Peer{ID: "gw-1", Conn: gw1})
	if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
		t.Errorf("a call whose first holder is down and second is up: %v", err)
	}
}
