package gateway_test

import (
	"context"
	"crypto/tls"
	"net"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// refused is the refusal counter's series for who and reason.
func refused(who string, reason gateway.RefusalReason) string {
	return `grpctunnel_gateway_refused_total{reason="` + string(reason) + `",who="` + who + `"}`
}

// logged reports whether log has a line msg with reason.
func logged(t *testing.T, log *testkit.JSONLog, msg string, reason gateway.RefusalReason) bool {
	for _, r := range log.Records(t, msg) {
		if r["reason"] == string(reason) {
			return true
		}
	}
	return false
}

// TestRefusedAgentsAndCallers: each tunnel and call the gateway refuses is
// counted and logged under its reason.
func TestRefusedAgentsAndCallers(t *testing.T) {
	reg := prometheus.NewRegistry()
	var log testkit.JSONLog
	opts := gateway.Options{
		Registerer: reg,
		Logger:     log.Logger(),
		AuthorizeAgent: func(ctx context.Context, key string) error {
			switch key {
			case "bad-token":
				return gateway.Refuse(gateway.ReasonBadToken, status.Error(codes.Unauthenticated, "unknown token"))
			case "anonymous":
				return status.Error(codes.Unauthenticated, "who are you")
			}
			return nil
		},
		AuthorizeCall: func(ctx context.Context, _ string, _ []string) error {
			if len(metadata.ValueFromIncomingContext(ctx, "token")) == 0 {
				return gateway.Refuse(gateway.ReasonNoToken, status.Error(codes.Unauthenticated, "no token"))
			}
			return nil
		},
	}
	opts.Tunnel.MaxReverseTunnelsPerKey = 1
	g, gw := startGateway(t, opts)
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	ctx := context.Background()

	// Before any refusal every series is there, at zero.
	if got := samples(t, reg); got[refused("agent", gateway.ReasonBadToken)] != 0 || len(got) == 0 {
		t.Fatalf("refusal series before any refusal: %v", got)
	}
	if _, ok := samples(t, reg)[refused("connection", gateway.ReasonPlaintext)]; !ok {
		t.Error("the plaintext series is not there before its first refusal")
	}

	open := func(key string) error {
		rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(gw))
		_, err := rs.Serve(metadata.AppendToOutgoingContext(ctx, gateway.DefaultKeyHeader, key))
		return err
	}
	for _, tc := range []struct {
		key    string
		code   codes.Code
		reason gateway.RefusalReason
	}{
		{"bad-token", codes.Unauthenticated, gateway.ReasonBadToken},
		{"anonymous", codes.Unauthenticated, gateway.ReasonUnauthenticated},
		{"a,b", codes.InvalidArgument, gateway.ReasonBadKey},
		{"site-a", codes.ResourceExhausted, gateway.ReasonTooManyTunnels},
	} {
		if err := open(tc.key); status.Code(err) != tc.code {
			t.Errorf("tunnel for %q: %v, want %v", tc.key, err, tc.code)
		}
	}
	fwd, err := tunnelpb.NewTunnelServiceClient(gw).OpenTunnel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fwd.Recv(); status.Code(err) != codes.Unimplemented {
		t.Errorf("forward tunnel: %v", err)
	}
	_, err = grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("call without a token: %v", err)
	}

	for _, w := range []struct {
		who    string
		reason gateway.RefusalReason
	}{
		{"agent", gateway.ReasonBadToken},
		{"agent", gateway.ReasonUnauthenticated},
		{"agent", gateway.ReasonBadKey},
		{"agent", gateway.ReasonTooManyTunnels},
		{"agent", gateway.ReasonForwardTunnel},
		{"caller", gateway.ReasonNoToken},
	} {
		series := refused(w.who, w.reason)
		waitFor(t, func() bool { return samples(t, reg)[series] == 1 })
		if !logged(t, &log, w.who+" refused", w.reason) {
			t.Errorf("no %q line with reason %s:\n%v", w.who+" refused", w.reason, log.Records(t, w.who+" refused"))
		}
	}
	// The agent with its one tunnel was not refused.
	if n := samples(t, reg)[refused("agent", gateway.ReasonDenied)]; n != 0 {
		t.Errorf("%v denied agents", n)
	}
}

// TestRefusedHandshakes: with the gateway's Credentials, a client whose
// certificate the gateway does not trust, one with no certificate and one
// in plaintext are each counted and logged.
func TestRefusedHandshakes(t *testing.T) {
	ca, stranger := newTestCA(t), newTestCA(t)
	reg := prometheus.NewRegistry()
	var log testkit.JSONLog
	g, err := gateway.New(gateway.Options{Registerer: reg, Logger: log.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	creds := g.Credentials(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{ca.issue(t, "gateway")},
		ClientCAs:    ca.pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}))
	srv := grpc.NewServer(append(g.ServerOptions(), grpc.Creds(creds))...)
	g.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	defer func() {
		srv.Stop()
		<-served
	}()

	check := func(name string, client credentials.TransportCredentials, reason gateway.RefusalReason) {
		t.Helper()
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(client))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable {
			t.Errorf("%s: %v, want Unavailable", name, err)
		}
		series := refused("connection", reason)
		waitFor(t, func() bool { return samples(t, reg)[series] >= 1 })
		waitFor(t, func() bool { return logged(t, &log, "TLS handshake refused", reason) })
	}
	check("certificate of another CA", credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{stranger.issue(t, "intruder")}, RootCAs: ca.pool,
	}), gateway.ReasonUntrustedCertificate)
	check("no certificate", credentials.NewTLS(&tls.Config{RootCAs: ca.pool}), gateway.ReasonNoCertificate)
	check("plaintext", insecure.NewCredentials(), gateway.ReasonPlaintext)

	for _, r := range log.Records(t, "TLS handshake refused") {
		if r["reason"] == string(gateway.ReasonUntrustedCertificate) && r["unverified_subject"] != "CN=intruder" {
			t.Errorf("the untrusted certificate's line: %v", r)
		}
	}
	// A client with a good certificate is not refused.
	good := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{ca.issue(t, "operator")}, RootCAs: ca.pool})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(good))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("a trusted client: %v", err)
	}
}
