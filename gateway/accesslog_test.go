package gateway_test

import (
	"context"
	"strings"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

// TestAccessLog: every call that ends at the gateway gets one line with
// its method, key, code and payload bytes each way; calls of all four
// kinds through an agent, a refused call, a call to an unknown agent and
// one to the gateway's own health.
func TestAccessLog(t *testing.T) {
	var access, log testkit.JSONLog
	g, gw := startGateway(t, gateway.Options{
		AccessLog: access.Logger(),
		Logger:    log.Logger(),
		AuthorizeCall: func(ctx context.Context, _ string, _ []string) error {
			if len(metadata.ValueFromIncomingContext(ctx, "deny")) > 0 {
				return status.Error(codes.PermissionDenied, "denied")
			}
			return nil
		},
	})
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	ctx := context.Background()
	client := grpchantesting.NewTestServiceClient(keyed(gw, "site-a"))
	payload := []byte("0123456789")

	if err := testkit.CallEveryKind(ctx, client, payload, 3); err != nil {
		t.Fatal(err)
	}
	_, err := client.Unary(metadata.AppendToOutgoingContext(ctx, "deny", "1"), &grpchantesting.Message{Payload: payload})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("refused call: %v", err)
	}
	_, err = grpchantesting.NewTestServiceClient(keyed(gw, "nobody")).Unary(ctx, &grpchantesting.Message{Payload: payload})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("call to an unknown agent: %v", err)
	}
	if _, err := healthpb.NewHealthClient(gw).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}

	const svc = "/grpchantesting.TestService/"
	want := []struct {
		method, key, code string
		bytes             bool // payload both ways
	}{
		{svc + "Unary", "site-a", "OK", true},
		{svc + "ClientStream", "site-a", "OK", true},
		{svc + "ServerStream", "site-a", "OK", true},
		{svc + "BidiStream", "site-a", "OK", true},
		{svc + "Unary", "site-a", "PermissionDenied", false},
		{svc + "Unary", "nobody", "Unavailable", false},
		{"/grpc.health.v1.Health/Check", "", "OK", false},
	}
	// A call's line is written once the gateway has ended it, which for a
	// stream may be just after its caller saw the end: the lines are
	// matched by what they say, not by their order.
	waitFor(t, func() bool { return len(access.Records(t, gateway.AccessLogMessage)) >= len(want) })
	recs := access.Records(t, gateway.AccessLogMessage)
	if len(recs) != len(want) {
		t.Fatalf("%d access log lines, want %d: %v", len(recs), len(want), recs)
	}
	used := make([]bool, len(recs))
	for _, w := range want {
		i := -1
		for j, r := range recs {
			if !used[j] && r["method"] == w.method && r["key"] == w.key && r["code"] == w.code {
				i = j
				break
			}
		}
		if i < 0 {
			t.Errorf("no line with method %s, key %q, code %s: %v", w.method, w.key, w.code, recs)
			continue
		}
		used[i] = true
		r := recs[i]
		if r["level"] != "INFO" {
			t.Errorf("line %d: %v; want level INFO", i, r)
		}
		req, _ := r["req_bytes"].(float64)
		resp, _ := r["resp_bytes"].(float64)
		if w.bytes && (req < float64(len(payload)) || resp < float64(len(payload))) {
			t.Errorf("line %d (%s): req_bytes %v, resp_bytes %v; want at least %d each", i, w.method, req, resp, len(payload))
		}
		if peer, _ := r["peer"].(string); peer == "" {
			t.Errorf("line %d has no peer: %v", i, r)
		}
		if _, ok := r["duration_ms"].(float64); !ok {
			t.Errorf("line %d has no duration_ms: %v", i, r)
		}
		// Three messages of the client stream, each the payload at least.
		if w.method == svc+"ClientStream" && req < 3*float64(len(payload)) {
			t.Errorf("client stream: req_bytes %v, want at least %d", req, 3*len(payload))
		}
	}
	// The refused call is a refusal too, in the gateway's own log.
	waitFor(t, func() bool { return len(log.Records(t, "caller refused")) == 1 })
	// The tunnel itself is not a call.
	for _, r := range recs {
		if m, _ := r["method"].(string); m == "/grpctunnel.v1.TunnelService/OpenReverseTunnel" {
			t.Errorf("the agent's tunnel is in the access log: %v", r)
		}
	}
}

// TestAccessLogBoundsCallerText: a method name and a key the caller makes
// up are cut, not repeated whole.
func TestAccessLogBoundsCallerText(t *testing.T) {
	var access testkit.JSONLog
	_, gw := startGateway(t, gateway.Options{AccessLog: access.Logger()})
	long := strings.Repeat("k", 4000)
	err := gw.Invoke(metadata.AppendToOutgoingContext(context.Background(), gateway.DefaultKeyHeader, long),
		"/"+long+"/M", &grpchantesting.Message{}, &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("call with a long key: %v", err)
	}
	waitFor(t, func() bool { return len(access.Records(t, gateway.AccessLogMessage)) == 1 })
	r := access.Records(t, gateway.AccessLogMessage)[0]
	for _, f := range []string{"method", "key"} {
		if v, _ := r[f].(string); len(v) > 300 || len(v) < 100 {
			t.Errorf("%s has %d bytes, want it cut near 256", f, len(v))
		}
	}
}
