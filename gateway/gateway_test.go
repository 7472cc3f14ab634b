package gateway_test

import (
	"bytes"
	"context"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startGateway serves a gateway configured by opts and returns it with a
// client connection to its port.
func startGateway(t *testing.T, opts gateway.Options) (*gateway.Gateway, *grpc.ClientConn) {
	t.Helper()
	g, err := gateway.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(g.ServerOptions()...)
	g.Register(srv)
	return g, loopback.Serve(t, srv)
}

// backendHealth is the health service of every test backend; it reports a
// service the gateway does not know, to tell the two apart.
const backendHealth = "backend.only"

// startBackend serves the test service, health and reflection: the kind of
// service an agent exposes.
func startBackend(t *testing.T) *grpc.ClientConn {
	t.Helper()
	srv := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(srv, &grpchantesting.TestServer{})
	h := health.NewServer()
	h.SetServingStatus(backendHealth, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, h)
	reflection.Register(srv)
	return loopback.Serve(t, srv)
}

// startAgent runs an agent with key and n tunnels until the test ends, and
// waits until its tunnels are all open.
func startAgent(t *testing.T, g *gateway.Gateway, gw, target *grpc.ClientConn, key string, n int) {
	t.Helper()
	var (
		mu   sync.Mutex
		open = make(map[int]bool)
		all  = make(chan struct{})
	)
	a, err := agent.New(gw, target, agent.Options{Key: key, Reconnect: tunnel.ReconnectOptions{
		Tunnels: n,
		OnStateChange: func(c tunnel.StateChange) {
			mu.Lock()
			defer mu.Unlock()
			open[c.Tunnel] = c.State == tunnel.TunnelOpen
			count := 0
			for _, o := range open {
				if o {
					count++
				}
			}
			if count == n && all != nil {
				close(all)
				all = nil
			}
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	wait := all
	mu.Unlock()
	before := tunnelsOf(g, key) // another agent's, with the same key
	done := make(chan error, 1)
	go func() { done <- a.Run(context.Background()) }()
	t.Cleanup(func() {
		a.Stop()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	select {
	case <-wait:
	case err := <-done:
		t.Fatalf("agent ended early: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("agent's tunnels did not open")
	}
	// The agent reports a tunnel open once it serves; the gateway records
	// it a moment later, in the same handshake.
	waitFor(t, func() bool { return tunnelsOf(g, key) == before+n })
}

func tunnelsOf(g *gateway.Gateway, key string) int {
	for _, a := range g.Agents() {
		if a.GetKey() == key {
			return len(a.GetTunnels())
		}
	}
	return 0
}

// waitFor polls cond until it holds; see testkit.WaitFor.
var waitFor = testkit.WaitFor

// keyed is a channel that names the agent key on every call, as a caller of
// the gateway does.
func keyed(cc grpc.ClientConnInterface, key string) grpc.ClientConnInterface {
	return testkit.Header{ClientConnInterface: cc, Key: gateway.DefaultKeyHeader, Value: key}
}

func TestCallsReachTheAgentsService(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	startAgent(t, g, gw, startBackend(t), "site-a", 2)
	grpchantesting.RunChannelTestCases(t, keyed(gw, "site-a"), true)
}

func TestKeyHeaderIsNotForwarded(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "kept", "yes")
	resp, err := grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(ctx, &grpchantesting.Message{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := resp.GetHeaders()[gateway.DefaultKeyHeader]; ok {
		t.Errorf("the backend saw the key header: %v", resp.GetHeaders())
	}
	if resp.GetHeaders()["kept"] == nil {
		t.Errorf("the backend did not see the caller's other headers: %v", resp.GetHeaders())
	}
}

func TestRoutingErrors(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	ctx := context.Background()

	_, err := grpchantesting.NewTestServiceClient(keyed(gw, "site-b")).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `no agent is connected with tunnel-key "site-b"`) {
		t.Errorf("unknown key: %v", err)
	}
	_, err = grpchantesting.NewTestServiceClient(gw).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `"tunnel-key" header`) {
		t.Errorf("no key: %v", err)
	}
}

func TestLocalServicesWithoutKey(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	ctx := context.Background()

	// Without a key, health is the gateway's; with one, the agent's.
	resp, err := healthpb.NewHealthClient(gw).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("gateway health: %v, %v", resp, err)
	}
	_, err = healthpb.NewHealthClient(gw).Check(ctx, &healthpb.HealthCheckRequest{Service: backendHealth})
	if status.Code(err) != codes.NotFound {
		t.Errorf("gateway health knows the backend's service: %v", err)
	}
	resp, err = healthpb.NewHealthClient(keyed(gw, "site-a")).Check(ctx, &healthpb.HealthCheckRequest{Service: backendHealth})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("agent's health: %v, %v", resp, err)
	}

	if got := listServices(t, gw); !slices.Contains(got, "grpctunnel.admin.v1.AdminService") || slices.Contains(got, "grpchantesting.TestService") {
		t.Errorf("gateway's reflection lists %v", got)
	}
	if got := listServices(t, keyed(gw, "site-a")); !slices.Contains(got, "grpchantesting.TestService") || slices.Contains(got, "grpctunnel.admin.v1.AdminService") {
		t.Errorf("agent's reflection lists %v", got)
	}

	list, err := adminpb.NewAdminServiceClient(gw).ListAgents(ctx, &adminpb.ListAgentsRequest{})
	if err != nil || len(list.GetAgents()) != 1 || list.GetAgents()[0].GetKey() != "site-a" || len(list.GetAgents()[0].GetTunnels()) != 1 {
		t.Fatalf("ListAgents: %v, %v", list, err)
	}
	if tun := list.GetAgents()[0].GetTunnels()[0]; !strings.HasPrefix(tun.GetPeer(), "127.0.0.1:") || tun.GetOpenedAt() == nil {
		t.Errorf("tunnel %v", tun)
	}
	// The health check and the reflection stream went through the tunnel.
	if tun := list.GetAgents()[0].GetTunnels()[0]; tun.GetStreamsStarted() < 2 || tun.GetBytesSent() == 0 || tun.GetBytesReceived() == 0 || tun.GetOpenStreams() > 1 {
		t.Errorf("tunnel traffic %v", tun)
	}
	list, err = adminpb.NewAdminServiceClient(gw).ListAgents(ctx, &adminpb.ListAgentsRequest{Key: "site-b"})
	if err != nil || len(list.GetAgents()) != 0 {
		t.Errorf("ListAgents for a missing key: %v, %v", list, err)
	}
}

// listServices asks a server's reflection service for its services.
func listServices(t *testing.T, conn grpc.ClientConnInterface) []string {
	t.Helper()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	err = stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names
}

func TestAgentsMustBeAllowed(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{AuthorizeAgent: func(ctx context.Context, key string) error {
		if key != "allowed" {
			return status.Error(codes.PermissionDenied, "not you")
		}
		return nil
	}})
	open := func(md ...string) (bool, error) {
		ctx := metadata.AppendToOutgoingContext(context.Background(), md...)
		return tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(gw)).Serve(ctx)
	}
	for _, tc := range []struct {
		md   []string
		code codes.Code
	}{
		{[]string{"tunnel-key", "denied"}, codes.PermissionDenied},
		{nil, codes.InvalidArgument},
		{[]string{"tunnel-key", "a", "tunnel-key", "b"}, codes.InvalidArgument},
		{[]string{"tunnel-key", "a,b"}, codes.InvalidArgument},
		{[]string{"tunnel-key", strings.Repeat("k", 300)}, codes.InvalidArgument},
	} {
		started, err := open(tc.md...)
		if started || status.Code(err) != tc.code {
			t.Errorf("%v: started=%v, %v; want %v", tc.md, started, err, tc.code)
		}
	}
	_, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(gw)).Start(context.Background())
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("forward tunnel: %v", err)
	}
	startAgent(t, g, gw, startBackend(t), "allowed", 1)
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	g, gw := startGateway(t, gateway.Options{Registerer: reg, MaxMetricKeys: 1})
	backend := startBackend(t)
	startAgent(t, g, gw, backend, "first", 2)
	startAgent(t, g, gw, backend, "second", 1)
	ctx := context.Background()
	for _, key := range []string{"first", "first", "second", "nobody"} {
		_, _ = grpchantesting.NewTestServiceClient(keyed(gw, key)).Unary(ctx, &grpchantesting.Message{Payload: []byte("0123456789")})
	}
	_, _ = healthpb.NewHealthClient(gw).Check(ctx, &healthpb.HealthCheckRequest{})

	// Only the first key gets a label of its own; the second agent's and
	// an unknown caller-supplied key share "_other".
	want := map[string]float64{
		`grpctunnel_gateway_agent_tunnels{key="first"}`:                  2,
		`grpctunnel_gateway_agent_tunnels{key="_other"}`:                 1,
		`grpctunnel_gateway_agent_tunnels_opened_total{key="first"}`:     2,
		`grpctunnel_gateway_rpcs_total{code="OK",key="first"}`:           2,
		`grpctunnel_gateway_rpcs_total{code="OK",key="_other"}`:          1,
		`grpctunnel_gateway_rpcs_total{code="Unavailable",key="_other"}`: 1,
		`grpctunnel_gateway_rpcs_total{code="OK",key="_none"}`:           1,
		`grpctunnel_gateway_rpcs_in_flight`:                              0,
	}
	// gRPC reports a call's end to the stats handler after the caller may
	// already have its answer.
	var got map[string]float64
	waitFor(t, func() bool {
		got = samples(t, reg)
		return got[`grpctunnel_gateway_rpcs_in_flight`] == 0 && got[`grpctunnel_gateway_rpcs_total{code="OK",key="first"}`] == 2
	})
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if in := got[`grpctunnel_gateway_rpc_bytes_total{direction="in",key="first"}`]; in < 2*10 {
		t.Errorf("bytes in for first: %v", in)
	}
	if out := got[`grpctunnel_gateway_rpc_bytes_total{direction="out",key="first"}`]; out < 2*10 {
		t.Errorf("bytes out for first: %v", out)
	}
	for k := range got {
		if strings.Contains(k, "nobody") || strings.Contains(k, `"second"`) {
			t.Errorf("unbounded label value in %s", k)
		}
	}
}

// samples flattens what reg gathers into "name{label="value",...}" keys,
// labels sorted by name as Prometheus gathers them.
func samples(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, f := range families {
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+`="`+l.GetValue()+`"`)
			}
			name := f.GetName()
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetCounter() != nil:
				out[name] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				out[name] = m.GetGauge().GetValue()
			}
		}
	}
	return out
}

func TestShutdownDrainsAgents(t *testing.T) {
	g, err := gateway.New(gateway.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(g.ServerOptions()...)
	g.Register(srv)
	gw := loopback.Serve(t, srv)
	startAgent(t, g, gw, startBackend(t), "site-a", 2)

	g.Shutdown()
	resp, err := healthpb.NewHealthClient(gw).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health while draining: %v, %v", resp, err)
	}
	// GracefulStop returns once the drained tunnels have ended; the
	// agent keeps trying to come back and is refused.
	srv.GracefulStop()
	if n := tunnelsOf(g, "site-a"); n != 0 {
		t.Errorf("%d tunnels left after the drain", n)
	}
}

func TestFanOutToSeveralAgents(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	backend := startBackend(t)
	startAgent(t, g, gw, backend, "a", 1)
	startAgent(t, g, gw, backend, "b", 1)

	// One labelled result per agent named, including the one that is not
	// connected.
	got := testkit.FanOut(t, gw, gateway.DefaultKeyHeader, "a, b", "gone")
	if want := map[string]string{"a": "ping", "b": "ping", "gone": "Unavailable"}; !maps.Equal(got, want) {
		t.Errorf("results %v, want %v", got, want)
	}
}

// TestCompressedHopToAgents checks that CallOptions reach the calls the
// gateway forwards: with grpc.UseCompressor the agent's tunnel carries a
// compressible call in a fraction of its size, both ways.
func TestCompressedHopToAgents(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{CallOptions: []grpc.CallOption{grpc.UseCompressor(gzip.Name)}})
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	grpchantesting.RunChannelTestCases(t, keyed(gw, "site-a"), true)

	bytesEachWay := func() (sent, received uint64) {
		for _, a := range g.Agents() {
			for _, tn := range a.GetTunnels() {
				sent, received = sent+tn.GetBytesSent(), received+tn.GetBytesReceived()
			}
		}
		return sent, received
	}
	sent0, received0 := bytesEachWay()
	payload := bytes.Repeat([]byte("compressible "), 1<<16)
	resp, err := grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(context.Background(), &grpchantesting.Message{Payload: payload})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(resp.GetPayload(), payload) {
		t.Fatal("the agent's answer differs from the request")
	}
	// The counters move as chunks cross the tunnel, by the time the call
	// is over on this side.
	sent, received := bytesEachWay()
	if sent-sent0 > uint64(len(payload)/20) || received-received0 > uint64(len(payload)/20) {
		t.Errorf("a %d-byte payload took %d bytes to the agent and %d back; want it compressed", len(payload), sent-sent0, received-received0)
	}
}
