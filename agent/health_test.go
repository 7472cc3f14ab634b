package agent_test

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

// TestServiceDownAndBack: calls through the gateway to an agent whose
// service is down fail with Unavailable; the agent logs that once, not per
// call, its health and metrics say so, and when the service is back at the
// same address the agent logs that once and reports itself healthy again.
func TestServiceDownAndBack(t *testing.T) {
	// The service's address, free for now: the service starts later.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svcAddr := lis.Addr().String()
	lis.Close()

	gw, gwAddr := serveGateway(t, "127.0.0.1:0")
	toGateway, err := grpc.NewClient(gwAddr, append(agent.DialOptions(0), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer toGateway.Close()
	toService, err := grpc.NewClient(svcAddr, append(agent.DialOptions(0), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer toService.Close()

	var logs testkit.JSONLog
	reg := prometheus.NewRegistry()
	a, err := agent.New(toGateway, toService, agent.Options{
		Key: "site", Registerer: reg,
		Logger: logs.Logger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- a.Run(context.Background()) }()
	defer func() { a.Stop(); <-ran }()
	testkit.WaitFor(t, func() bool { return gw.tunnels("site") == 1 })
	if h := a.Health(); h.TunnelsOpen != 1 || !h.ServiceReachable {
		t.Fatalf("health with the tunnel open, before any call: %+v", h)
	}
	if v := metricValue(t, reg, "grpctunnel_agent_tunnels_open"); v != 1 {
		t.Errorf("grpctunnel_agent_tunnels_open = %v, want 1", v)
	}

	caller, err := grpc.NewClient(gwAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer caller.Close()
	client := grpchantesting.NewTestServiceClient(testkit.Header{ClientConnInterface: caller, Key: gateway.DefaultKeyHeader, Value: "site"})
	for range 5 {
		_, err := client.Unary(t.Context(), &grpchantesting.Message{})
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "cannot reach its service") {
			t.Fatalf("a call while the service is down: %v", err)
		}
	}
	if n := len(logs.Records(t, "service unreachable: calls fail with Unavailable until it is back")); n != 1 {
		t.Errorf("%d log lines say the service is unreachable after 5 failed calls, want 1:\n%s", n, logs.String())
	}
	if h := a.Health(); h.ServiceReachable {
		t.Errorf("health after the failed calls: %+v, want the service unreachable", h)
	}
	if v := metricValue(t, reg, "grpctunnel_agent_service_reachable"); v != 0 {
		t.Errorf("grpctunnel_agent_service_reachable = %v, want 0", v)
	}
	if v := metricValue(t, reg, "grpctunnel_agent_service_unreachable_calls_total"); v != 5 || a.ServiceUnreachable() != 5 {
		t.Errorf("calls counted as failed for want of the service: metric %v, ServiceUnreachable %d; want 5", v, a.ServiceUnreachable())
	}

	// The service comes back where it was.
	lis, err = net.Listen("tcp", svcAddr)
	if err != nil {
		t.Skipf("the service's port was taken meanwhile: %v", err)
	}
	svc := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(svc, &grpchantesting.TestServer{})
	served := make(chan struct{})
	go func() { defer close(served); _ = svc.Serve(lis) }()
	defer func() { svc.Stop(); <-served }()

	testkit.WaitFor(t, func() bool { return a.Health().ServiceReachable })
	if _, err := client.Unary(t.Context(), &grpchantesting.Message{}); err != nil {
		t.Fatalf("a call once the service is back: %v", err)
	}
	if back := logs.Records(t, "service reachable again"); len(back) != 1 || back[0]["failed_calls"] != float64(5) {
		t.Errorf("lines that say the service is back: %v; want 1, with failed_calls 5:\n%s", back, logs.String())
	}
	if v := metricValue(t, reg, "grpctunnel_agent_service_reachable"); v != 1 {
		t.Errorf("grpctunnel_agent_service_reachable = %v once back, want 1", v)
	}
}

// metricValue is the value of the one gauge or counter named name in reg.
func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			m := f.GetMetric()[0]
			return m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no single metric %s", name)
	return 0
}
