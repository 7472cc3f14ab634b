package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"strings"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// startTestService serves grpchan's test service, which has calls of all
// four kinds, on loopback as the service beside an agent.
func startTestService(t *testing.T) string {
	t.Helper()
	srv := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(srv, &grpchantesting.TestServer{})
	return loopback.ServeAddr(t, srv)
}

// metricsAddr is the address a gateway started with --metrics logged.
func metricsAddr(t *testing.T, gw *inProcess) string {
	t.Helper()
	addr, _ := gw.stderr.waitMsg(t, testContext(t), "metrics listening")["addr"].(string)
	return "http://" + addr + "/metrics"
}

// waitRefused waits until the gateway's metrics count at least one
// refusal of who for reason.
func waitRefused(t *testing.T, ctx context.Context, url, who string, reason gateway.RefusalReason) {
	t.Helper()
	series := `grpctunnel_gateway_refused_total{reason="` + string(reason) + `",who="` + who + `"}`
	waitMetrics(t, ctx, url, func(body string) bool { return metricValue(body, series) >= 1 })
}

// waitRefusalLine waits for the gateway's log line msg with reason.
func waitRefusalLine(t *testing.T, ctx context.Context, gw *inProcess, msg string, reason gateway.RefusalReason) map[string]any {
	t.Helper()
	return gw.stderr.waitRecord(t, ctx, msg+" with reason "+string(reason), func(r map[string]any) bool {
		return r["msg"] == msg && r["reason"] == string(reason)
	})
}

// TestGatewayAccessLog: with --access-log the gateway writes a JSON line
// for each call, of all four kinds, with its method, key, code, payload
// bytes and the caller's certificate; a call refused for want of a token
// gets its line too, besides a refusal line and count.
func TestGatewayAccessLog(t *testing.T) {
	ca := newTestCA(t, "access")
	cert, key := ca.serverCert(t)
	callers := writeFile(t, t.TempDir(), "callers", []byte("caller-secret\n"))
	gw, addr := startGatewayCmd(t, "--access-log", "--metrics", "127.0.0.1:0",
		"--tls-cert", cert, "--tls-key", key, "--client-ca", ca.pemFile, "--caller-token-file", callers)
	url := metricsAddr(t, gw)
	ctx := testContext(t)

	agentCert, agentKey := ca.clientCert(t, "sensor-1")
	ag := startAgentCmd(t, "--gateway", addr, "--key", "sensor-1", "--target", startTestService(t),
		"--ca", ca.pemFile, "--tls-cert", agentCert, "--tls-key", agentKey, "--server-name", "localhost")
	callerCert, callerKey := ca.clientCert(t, "operator")
	conn := dialTLS(t, addr, ca, callerCert, callerKey)
	authed := metadata.AppendToOutgoingContext(ctx, callerTokenHeader, "Bearer caller-secret")
	waitAgent(t, authed, conn, "sensor-1", 1)

	callCtx := metadata.AppendToOutgoingContext(authed, "tunnel-key", "sensor-1")
	client := grpchantesting.NewTestServiceClient(conn)
	payload := []byte("0123456789")
	if err := testkit.CallEveryKind(callCtx, client, payload, 2); err != nil {
		t.Fatal(err)
	}
	// Without the caller token.
	_, err := client.Unary(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "sensor-1"), &grpchantesting.Message{Payload: payload})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("call without a token: %v", err)
	}

	const svc = "/grpchantesting.TestService/"
	for _, w := range []struct {
		method, code string
		bytes        bool
	}{
		{svc + "Unary", "OK", true},
		{svc + "ClientStream", "OK", true},
		{svc + "ServerStream", "OK", true},
		{svc + "BidiStream", "OK", true},
		{svc + "Unary", "Unauthenticated", false},
	} {
		rec := gw.stderr.waitRecord(t, ctx, "for "+w.method+" "+w.code, func(r map[string]any) bool {
			return r["msg"] == gateway.AccessLogMessage && r["method"] == w.method && r["code"] == w.code
		})
		req, _ := rec["req_bytes"].(float64)
		resp, _ := rec["resp_bytes"].(float64)
		if rec["key"] != "sensor-1" || rec["identity"] != "CN=operator" || rec["level"] != "INFO" {
			t.Errorf("access log line %v; want key sensor-1, identity CN=operator", rec)
		}
		if w.bytes && (req < float64(len(payload)) || resp < float64(len(payload))) {
			t.Errorf("%s: req_bytes %v, resp_bytes %v; want at least %d each", w.method, req, resp, len(payload))
		}
		if peer, _ := rec["peer"].(string); !strings.HasPrefix(peer, "127.0.0.1:") {
			t.Errorf("%s: peer %q", w.method, peer)
		}
	}
	rec := waitRefusalLine(t, ctx, gw, "caller refused", gateway.ReasonNoToken)
	if rec["method"] != svc+"Unary" || rec["key"] != "sensor-1" || rec["identity"] != "CN=operator" {
		t.Errorf("the refused caller's line: %v", rec)
	}
	waitRefused(t, ctx, url, "caller", gateway.ReasonNoToken)

	stopAll(t, ag, gw)
}

// TestGatewayRefusals: refused agents and TLS handshakes each leave a log
// line and a count with their reason: an unknown token, a key the agent's
// certificate does not name, a certificate of another CA and a plaintext
// client on the TLS port.
func TestGatewayRefusals(t *testing.T) {
	ca, other := newTestCA(t, "refusals"), newTestCA(t, "stranger")
	cert, key := ca.serverCert(t)
	dir := t.TempDir()
	tokens := writeFile(t, dir, "tokens", []byte("fleet-token\n"))
	gw, addr := startGatewayCmd(t, "--metrics", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key,
		"--client-ca", ca.pemFile, "--token-file", tokens, "--agent-key-from-cert")
	url := metricsAddr(t, gw)
	ctx := testContext(t)

	agentCert, agentKey := ca.clientCert(t, "sensor-1")
	conn := dialTLS(t, addr, ca, agentCert, agentKey)
	open := func(key, token string) error {
		rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
		_, err := rs.Serve(metadata.AppendToOutgoingContext(ctx, "tunnel-key", key), grpc.PerRPCCredentials(bearerToken{token: token}))
		return err
	}
	if err := open("sensor-1", "guessed-token"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("unknown token: %v", err)
	}
	if err := open("sensor-2", "fleet-token"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a key the certificate does not name: %v", err)
	}
	rec := waitRefusalLine(t, ctx, gw, "agent refused", gateway.ReasonBadToken)
	if rec["key"] != "sensor-1" || rec["identity"] != "CN=sensor-1" || rec["level"] != "WARN" {
		t.Errorf("the bad token's line: %v", rec)
	}
	if strings.Contains(gw.stderr.String(), "guessed-token") {
		t.Error("the gateway logged the token presented")
	}
	rec = waitRefusalLine(t, ctx, gw, "agent refused", gateway.ReasonKeyNotAllowed)
	if rec["key"] != "sensor-2" {
		t.Errorf("the wrong key's line: %v", rec)
	}
	waitRefused(t, ctx, url, "agent", gateway.ReasonBadToken)
	waitRefused(t, ctx, url, "agent", gateway.ReasonKeyNotAllowed)

	// Clients the TLS handshake turns away never make a call.
	strangerCert, strangerKey := other.clientCert(t, "intruder")
	for _, tc := range []struct {
		name   string
		conn   *grpc.ClientConn
		reason gateway.RefusalReason
	}{
		{"certificate of another CA", dialForcingCert(t, addr, ca, strangerCert, strangerKey), gateway.ReasonUntrustedCertificate},
		{"plaintext", dial(t, addr, insecure.NewCredentials()), gateway.ReasonPlaintext},
	} {
		_, err := grpchantesting.NewTestServiceClient(tc.conn).Unary(ctx, &grpchantesting.Message{})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s: %v, want Unavailable", tc.name, err)
		}
		rec := waitRefusalLine(t, ctx, gw, "TLS handshake refused", tc.reason)
		if peer, _ := rec["peer"].(string); !strings.HasPrefix(peer, "127.0.0.1:") {
			t.Errorf("%s: the line has no peer: %v", tc.name, rec)
		}
		waitRefused(t, ctx, url, "connection", tc.reason)
		_ = tc.conn.Close() // no reconnecting in the background
	}
	stopAll(t, gw)
}

// dialForcingCert is dialTLS for a client that presents its certificate
// even when it is not from a CA the gateway asks for: a Go client would
// otherwise send none, and be refused for that.
func dialForcingCert(t *testing.T, addr string, ca *testCA, certFile, keyFile string) *grpc.ClientConn {
	t.Helper()
	cfg, err := clientTLS(ca.pemFile, certFile, keyFile, "")
	if err != nil {
		t.Fatal(err)
	}
	cert := cfg.Certificates[0]
	cfg.Certificates = nil
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	return dial(t, addr, credentials.NewTLS(cfg))
}

// TestAccessLogDespiteLogLevel: the access log keeps its info lines when
// --log-level keeps only warnings of the rest.
func TestAccessLogDespiteLogLevel(t *testing.T) {
	var buf bytes.Buffer
	logs := &logFlags{format: "json", level: logLevel(slog.LevelWarn)}
	log := logs.logger(&buf)
	access := slog.New(infoFloor{log.Handler()})
	log.Info("dropped")
	access.Info(gateway.AccessLogMessage, "method", "/s/M")
	access.Debug("dropped too")
	if got := buf.String(); strings.Count(got, "\n") != 1 || !strings.Contains(got, `"method":"/s/M"`) {
		t.Errorf("logged %q; want the access line only", got)
	}
}
