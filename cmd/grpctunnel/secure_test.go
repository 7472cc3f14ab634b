package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/demo"
	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// startTarget serves a DeviceService named name on loopback, as the
// service beside an agent, until the end of the test.
func startTarget(t *testing.T, name string) string {
	t.Helper()
	srv := grpc.NewServer()
	demo.Register(srv, demo.NewDeviceService(name))
	return loopback.ServeAddr(t, srv)
}

// dial connects to addr with creds until the end of the test.
func dial(t *testing.T, addr string, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// dialTLS connects to addr trusting ca, presenting the client certificate
// in certFile and keyFile if given.
func dialTLS(t *testing.T, addr string, ca *testCA, certFile, keyFile string) *grpc.ClientConn {
	t.Helper()
	cfg, err := clientTLS(ca.pemFile, certFile, keyFile, "")
	if err != nil {
		t.Fatal(err)
	}
	return dial(t, addr, credentials.NewTLS(cfg))
}

// startGatewayCmd runs the gateway subcommand in process with args and
// returns it with the address it logged.
func startGatewayCmd(t *testing.T, args ...string) (*inProcess, string) {
	t.Helper()
	p := startInProcess(t, runGateway, append([]string{"--listen", "127.0.0.1:0", "--log-format", "json"}, args...)...)
	addr, _ := p.stderr.waitMsg(t, testContext(t), "listening")["addr"].(string)
	return p, addr
}

// startAgentCmd runs the agent subcommand in process with args.
func startAgentCmd(t *testing.T, args ...string) *inProcess {
	t.Helper()
	return startInProcess(t, runAgent, append([]string{"--log-format", "json", "--tunnels", "1"}, args...)...)
}

// waitAgent polls the admin service behind conn until it lists the agent
// with key with at least tunnels tunnels. ListAgents has no way to watch for a change, so
// this asks again every few milliseconds, until ctx ends the test.
func waitAgent(t *testing.T, ctx context.Context, conn grpc.ClientConnInterface, key string, tunnels int) *adminpb.Agent {
	t.Helper()
	admin := adminpb.NewAdminServiceClient(conn)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := admin.ListAgents(ctx, &adminpb.ListAgentsRequest{Key: key})
		if err != nil {
			t.Fatalf("ListAgents: %v", err)
		}
		if agents := resp.GetAgents(); len(agents) == 1 && len(agents[0].GetTunnels()) >= tunnels {
			return agents[0]
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("agent %q not listed with %d tunnels before %v", key, tunnels, ctx.Err())
		}
	}
}

// stopAll stops commands in order and checks that each exits 0 after a
// drain that the calls in progress did not outlast: the tests stop them
// with none.
func stopAll(t *testing.T, procs ...*inProcess) {
	t.Helper()
	for i, p := range procs {
		if code := p.stop(t); code != 0 || strings.Contains(p.stderr.String(), "drain cut short") {
			t.Errorf("command %d of %d exited %d; log:\n%s", i+1, len(procs), code, p.stderr.String())
		}
	}
}

// TestTokens: a gateway with TLS and a token file admits an agent with its
// token and refuses tunnels without one, with an unknown one, and with one
// bound to another key, whatever the rest of the call says.
func TestTokens(t *testing.T) {
	ca := newTestCA(t, "tokens")
	cert, key := ca.serverCert(t)
	dir := t.TempDir()
	tokens := writeFile(t, dir, "tokens", []byte("# tokens\nfleet-token\nsensor-token sensor-1\n"))
	gw, addr := startGatewayCmd(t, "--tls-cert", cert, "--tls-key", key, "--token-file", tokens)
	ctx := testContext(t)

	ag := startAgentCmd(t, "--gateway", addr, "--key", "sensor-1", "--target", startTarget(t, "sensor-1"),
		"--ca", ca.pemFile, "--token-file", writeFile(t, dir, "agent-token", []byte("sensor-token\n")))
	conn := dialTLS(t, addr, ca, "", "")
	waitAgent(t, ctx, conn, "sensor-1", 1)
	st, err := demopb.NewDeviceServiceClient(conn).GetStatus(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "sensor-1"), &demopb.GetStatusRequest{})
	if err != nil || st.GetServedBy() != "sensor-1" {
		t.Fatalf("GetStatus through the admitted agent: %v, %v", st, err)
	}

	// Raw tunnels show each refusal's status, as an agent receives it.
	stub := tunnelpb.NewTunnelServiceClient(conn)
	for _, tc := range []struct {
		name  string
		key   string
		token string
		want  codes.Code
	}{
		{"no token", "sensor-2", "", codes.Unauthenticated},
		{"unknown token", "sensor-2", "guessed-token", codes.Unauthenticated},
		{"token bound to another key", "sensor-2", "sensor-token", codes.PermissionDenied},
	} {
		var opts []grpc.CallOption
		if tc.token != "" {
			opts = append(opts, grpc.PerRPCCredentials(bearerToken{token: tc.token}))
		}
		rs := tunnel.NewReverseTunnelServer(stub)
		started, err := rs.Serve(metadata.AppendToOutgoingContext(ctx, "tunnel-key", tc.key), opts...)
		if started || status.Code(err) != tc.want {
			t.Errorf("%s: Serve = %t, %v; want not started, %v", tc.name, started, err, tc.want)
		}
	}

	// An agent with a wrong token keeps trying, and says at once, as an
	// error, that the gateway does not admit it.
	bad := startAgentCmd(t, "--gateway", addr, "--key", "sensor-2", "--target", "127.0.0.1:1",
		"--ca", ca.pemFile, "--token-file", writeFile(t, dir, "bad-token", []byte("sensor-token\n")))
	rec := bad.stderr.waitRecord(t, ctx, "at level ERROR", func(r map[string]any) bool { return r["level"] == "ERROR" })
	if msg, _ := rec["msg"].(string); !strings.Contains(msg, "the gateway at "+addr+" does not admit this agent") ||
		!strings.Contains(rec["err"].(string), "PermissionDenied") {
		t.Errorf("the refused agent logged %v", rec)
	}

	stopAll(t, bad, ag, gw)
}

// TestMutualTLS: with --client-ca the gateway admits only clients with a
// certificate from that CA, and lists an agent's verified identity.
func TestMutualTLS(t *testing.T) {
	ca := newTestCA(t, "mtls")
	cert, key := ca.serverCert(t)
	gw, addr := startGatewayCmd(t, "--tls-cert", cert, "--tls-key", key, "--client-ca", ca.pemFile)
	ctx := testContext(t)

	agentCert, agentKey := ca.clientCert(t, "sensor-7")
	ag := startAgentCmd(t, "--gateway", addr, "--key", "sensor-7", "--target", startTarget(t, "sensor-7"),
		"--ca", ca.pemFile, "--tls-cert", agentCert, "--tls-key", agentKey, "--server-name", "localhost")

	callerCert, callerKey := ca.clientCert(t, "operator")
	conn := dialTLS(t, addr, ca, callerCert, callerKey)
	got := waitAgent(t, ctx, conn, "sensor-7", 1)
	if id := got.GetTunnels()[0].GetIdentity(); id != "CN=sensor-7" {
		t.Errorf("the agent's identity is listed as %q, want CN=sensor-7", id)
	}

	// Without a client certificate there is no connection at all, let
	// alone a call.
	_, err := adminpb.NewAdminServiceClient(dialTLS(t, addr, ca, "", "")).ListAgents(ctx, &adminpb.ListAgentsRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("ListAgents without a client certificate: %v, want Unavailable", err)
	}
	// Nor in plaintext.
	_, err = adminpb.NewAdminServiceClient(dial(t, addr, insecure.NewCredentials())).ListAgents(ctx, &adminpb.ListAgentsRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("ListAgents in plaintext: %v, want Unavailable", err)
	}

	stopAll(t, ag, gw)
}

// TestAgentKeyFromCert: with --agent-key-from-cert an agent may announce
// only a key its certificate names.
func TestAgentKeyFromCert(t *testing.T) {
	ca := newTestCA(t, "keys")
	cert, key := ca.serverCert(t)
	gw, addr := startGatewayCmd(t, "--tls-cert", cert, "--tls-key", key, "--client-ca", ca.pemFile, "--agent-key-from-cert")
	ctx := testContext(t)

	agentCert, agentKey := ca.clientCert(t, "sensor-7")
	tlsArgs := []string{"--ca", ca.pemFile, "--tls-cert", agentCert, "--tls-key", agentKey, "--server-name", "localhost"}
	own := startAgentCmd(t, append([]string{"--gateway", addr, "--key", "sensor-7", "--target", startTarget(t, "sensor-7")}, tlsArgs...)...)
	other := startAgentCmd(t, append([]string{"--gateway", addr, "--key", "sensor-8", "--target", startTarget(t, "sensor-8")}, tlsArgs...)...)

	callerCert, callerKey := ca.clientCert(t, "operator")
	waitAgent(t, ctx, dialTLS(t, addr, ca, callerCert, callerKey), "sensor-7", 1)
	other.stderr.waitMsg(t, ctx, "the gateway at "+addr+" does not admit this agent (check --token-file, the client certificate and --key); retrying, later failures are logged as warnings")

	stopAll(t, own, other, gw)
}

// TestCallerTokens: with --caller-token-file a caller needs a token in the
// tunnel-authorization header, except for the gateway's health, and a token
// bound to a key reaches that agent only.
func TestCallerTokens(t *testing.T) {
	file := filepath.Join(t.TempDir(), "callers")
	if err := os.WriteFile(file, []byte("admin-secret\ncaller-secret sensor-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	gw, addr := startGatewayCmd(t, "--caller-token-file", file)
	ag := startAgentCmd(t, "--gateway", addr, "--key", "sensor-1", "--target", startTarget(t, "sensor-1"))
	ctx := testContext(t)
	conn := dial(t, addr, insecure.NewCredentials())
	waitAgent(t, metadata.AppendToOutgoingContext(ctx, callerTokenHeader, "Bearer admin-secret"), conn, "sensor-1", 1)

	device := demopb.NewDeviceServiceClient(conn)
	call := func(md ...string) error {
		_, err := device.GetStatus(metadata.AppendToOutgoingContext(ctx, md...), &demopb.GetStatusRequest{})
		return err
	}
	if err := call("tunnel-key", "sensor-1", callerTokenHeader, "Bearer caller-secret"); err != nil {
		t.Errorf("with its token: %v", err)
	}
	if err := call("tunnel-key", "sensor-1"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("without a token: %v, want Unauthenticated", err)
	}
	if err := call("tunnel-key", "sensor-2", callerTokenHeader, "Bearer caller-secret"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("another agent: %v, want PermissionDenied", err)
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health without a token: %v, %v", resp, err)
	}

	stopAll(t, ag, gw)
}
