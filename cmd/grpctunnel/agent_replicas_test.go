package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	replicahdr "github.com/grpctunnel/grpctunnel/internal/replica"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// TestAgentGatewayListErrors: each address of a --gateway list must be a
// host:port of its own, and the error names the one at fault.
func TestAgentGatewayListErrors(t *testing.T) {
	for _, tc := range []struct{ gateway, want string }{
		{"a:1,", `grpctunnel agent: --gateway "a:1,": address 2 of 2 is empty`},
		{",a:1", `grpctunnel agent: --gateway ",a:1": address 1 of 2 is empty`},
		{"a:1,b:", `grpctunnel agent: --gateway "a:1,b:": "b:" has no port: give host:port for every address`},
		{"a:1,b", `grpctunnel agent: --gateway "a:1,b": "b" has no port: give host:port for every address`},
		{"a:1, a:1", `grpctunnel agent: --gateway "a:1, a:1": "a:1" is listed twice`},
		{"dns:///a:1,b:2", `grpctunnel agent: --gateway "dns:///a:1,b:2": "dns:///a:1" is a gRPC target; a list takes host:port addresses only`},
		{"a", `grpctunnel agent: --gateway "a" has no port: give host:port`},
	} {
		code, stdout, stderr := runOnce(t, "agent", "--gateway", tc.gateway, "--key", "k", "--target", "t:1")
		first, rest, _ := strings.Cut(stderr, "\n")
		if code != 2 || stdout != "" || first != tc.want || !strings.Contains(rest, "Usage: grpctunnel agent") {
			t.Errorf("--gateway %q: exit %d, stdout %q, stderr:\n%s\nwant exit 2, the first line %q, then the usage", tc.gateway, code, stdout, stderr, tc.want)
		}
	}
}

// TestAgentGatewayList runs the agent with two gateways' addresses: it
// logs both, opens its tunnels over them, and when one gateway is gone it
// is on the other, reachable there.
func TestAgentGatewayList(t *testing.T) {
	ctx := testContext(t)
	target := startTarget(t, "sensor")
	gwA, addrA := startGatewayCmd(t)
	gwB, addrB := startGatewayCmd(t)
	ag := startAgentCmd(t, "--gateway", addrA+", "+addrB, "--key", "k", "--target", target, "--tunnels", "2")
	started := ag.stderr.waitMsg(t, ctx, "agent starting")
	if got := fmt.Sprint(started["gateways"]); got != fmt.Sprint([]any{addrA, addrB}) {
		t.Errorf("the agent started with gateways %v; want [%s %s]", got, addrA, addrB)
	}
	connA, connB := dial(t, addrA, insecure.NewCredentials()), dial(t, addrB, insecure.NewCredentials())
	tunnelsOn := func(conn *grpc.ClientConn) int {
		resp, err := adminpb.NewAdminServiceClient(conn).ListAgents(ctx, &adminpb.ListAgentsRequest{Key: "k"})
		if err != nil || len(resp.GetAgents()) != 1 {
			return 0
		}
		return len(resp.GetAgents()[0].GetTunnels())
	}
	testkit.WaitFor(t, func() bool { return tunnelsOn(connA)+tunnelsOn(connB) == 2 })

	stopAll(t, gwA)
	testkit.WaitFor(t, func() bool { return tunnelsOn(connB) == 2 })
	resp, err := healthpb.NewHealthClient(connB).Check(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "k"), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("the service through the gateway left: %v, %v", resp, err)
	}
	stopAll(t, ag, gwB)
}

// startReplicaServer serves a minimal replica of a gateway cluster: a
// tunnel handler keyed by tunnel-key that names itself id in the response
// header of the tunnels it accepts, as a replica does.
func startReplicaServer(t *testing.T, id string) (*tunnel.TunnelServiceHandler, string) {
	t.Helper()
	h := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		AffinityKey: func(ch tunnel.TunnelChannel) any {
			md, _ := metadata.FromIncomingContext(ch.Context())
			return md.Get(agent.DefaultKeyHeader)[0]
		},
	})
	srv := grpc.NewServer(grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		if err := grpc.SetHeader(ss.Context(), metadata.Pairs(replicahdr.Header, id)); err != nil {
			return err
		}
		return next(srv, ss)
	}))
	tunnelpb.RegisterTunnelServiceServer(srv, h.Service())
	return h, loopback.ServeAddr(t, srv)
}

// TestAgentSpreadsOverReplicas: an agent given three replicas' addresses
// puts its two tunnels on two of them, says so in its log, its /healthz
// and its metrics, and can be called through either.
func TestAgentSpreadsOverReplicas(t *testing.T) {
	ctx := testContext(t)
	target := startTarget(t, "sensor")
	handlers := map[string]*tunnel.TunnelServiceHandler{}
	var addrs []string
	for _, id := range []string{"r1", "r2", "r3"} {
		h, addr := startReplicaServer(t, id)
		handlers[id] = h
		addrs = append(addrs, addr)
	}
	ag := startAgentCmd(t, "--gateway", strings.Join(addrs, ","), "--key", "k", "--target", target, "--tunnels", "2", "--metrics", "127.0.0.1:0")
	metricsAddr, _ := ag.stderr.waitMsg(t, ctx, "metrics listening")["addr"].(string)
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	healthy := regexp.MustCompile(`^ok: 2 tunnels open, on gateway replicas (r[123]), (r[123]), the service reachable\n$`)
	var held []string
	testkit.WaitFor(t, func() bool {
		code, body := get("/healthz")
		m := healthy.FindStringSubmatch(body)
		if code != http.StatusOK || m == nil {
			return false
		}
		held = m[1:]
		return true
	})
	if held[0] == held[1] {
		t.Fatalf("both tunnels on %s", held[0])
	}
	for _, id := range held {
		testkit.WaitFor(t, func() bool { return len(handlers[id].AllReverseTunnels()) == 1 })
		resp, err := healthpb.NewHealthClient(handlers[id].KeyAsChannel("k")).Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("the service through replica %s: %v, %v", id, resp, err)
		}
	}
	if _, body := get("/metrics"); !strings.Contains(body, `grpctunnel_agent_gateway_replicas{key="k"} 2`) {
		t.Errorf("/metrics lacks the replicas:\n%s", body)
	}
	var named []string
	recs, _ := ag.stderr.records()
	for _, r := range recs {
		if r["msg"] == "tunnel open" {
			id, _ := r["replica"].(string)
			named = append(named, id)
		}
	}
	for _, id := range held {
		if !slices.Contains(named, id) {
			t.Errorf("no tunnel open line names replica %s: %v", id, named)
		}
	}
	stopAll(t, ag)
}

// TestGivenBackIsNoOutage: a tunnel the agent gave back, to move it to
// another replica, says nothing about reaching the gateway: it is not
// logged as the error that starts a streak of failures.
func TestGivenBackIsNoOutage(t *testing.T) {
	logs := newLogBuffer()
	r := &reachability{log: slog.New(slog.NewJSONHandler(logs, nil)), gateway: "a:1,b:2"}
	given := fmt.Errorf("%w: %w", tunnel.ErrGivenBack, errors.New(`gateway replica "r1" holds tunnel 0 of this agent already`))
	r.changed(tunnel.StateChange{State: tunnel.TunnelWaiting, Err: given})
	if logs.String() != "" {
		t.Errorf("a tunnel given back was logged as:\n%s", logs.String())
	}
	r.changed(tunnel.StateChange{State: tunnel.TunnelWaiting, Err: status.Error(codes.Unavailable, "connection refused")})
	if !strings.Contains(logs.String(), `"level":"ERROR","msg":"cannot reach the gateway at a:1,b:2;`) {
		t.Errorf("a failure to reach the gateways was logged as:\n%s", logs.String())
	}
}
