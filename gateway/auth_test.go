package gateway_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func TestAuthorizeCallAndDropHeaders(t *testing.T) {
	var seen []string
	g, gw := startGateway(t, gateway.Options{
		DropHeaders: []string{"Gateway-Token"},
		AuthorizeCall: func(ctx context.Context, method string, keys []string) error {
			seen = append(seen, method+" "+strings.Join(keys, ","))
			md, _ := metadata.FromIncomingContext(ctx)
			if len(md.Get("gateway-token")) == 0 {
				return status.Error(codes.Unauthenticated, "no token")
			}
			return nil
		},
	})
	startAgent(t, g, gw, startBackend(t), "site-a", 1)
	ctx := context.Background()

	_, err := grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(ctx, &grpchantesting.Message{})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("call without a token: %v", err)
	}
	_, err = healthpb.NewHealthClient(gw).Check(ctx, &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("local call without a token: %v", err)
	}

	ctx = metadata.AppendToOutgoingContext(ctx, "gateway-token", "t")
	resp, err := grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(ctx, &grpchantesting.Message{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := resp.GetHeaders()["gateway-token"]; ok {
		t.Errorf("the dropped header reached the backend: %v", resp.GetHeaders())
	}
	want := []string{
		"/grpchantesting.TestService/Unary site-a",
		"/grpc.health.v1.Health/Check ",
		"/grpchantesting.TestService/Unary site-a",
	}
	if strings.Join(seen, "|") != strings.Join(want, "|") {
		t.Errorf("AuthorizeCall saw %q, want %q", seen, want)
	}
}

// testCA issues certificates for the tests that need TLS.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue returns a certificate for common name cn and DNS names dns, good
// for servers and clients.
func (ca *testCA) issue(t *testing.T, cn string, dns ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		DNSNames:     dns,
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestCertificateNamesKey(t *testing.T) {
	ca := newTestCA(t)
	g, err := gateway.New(gateway.Options{AuthorizeAgent: gateway.CertificateNamesKey})
	if err != nil {
		t.Fatal(err)
	}
	serverCreds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{ca.issue(t, "gateway")},
		ClientCAs:    ca.pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	})
	srv := grpc.NewServer(append(g.ServerOptions(), grpc.Creds(serverCreds))...)
	g.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()

	open := func(cert tls.Certificate, key string) (bool, error) {
		creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.pool})
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(creds))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
		ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "tunnel-key", key))
		defer cancel()
		done := make(chan struct{})
		var started bool
		go func() {
			defer close(done)
			started, err = rs.Serve(ctx)
		}()
		// A tunnel that is admitted stays open: close it once the
		// gateway knows it, and report that it started.
		select {
		case <-done:
			return started, err
		case <-waitAgent(ctx, g, key):
			rs.Stop()
			<-done
			return true, nil
		}
	}

	if ok, err := open(ca.issue(t, "site-a"), "site-a"); !ok {
		t.Errorf("common name: %v", err)
	}
	if ok, err := open(ca.issue(t, "host", "site-b"), "site-b"); !ok {
		t.Errorf("DNS name: %v", err)
	}
	if ok, err := open(ca.issue(t, "site-a"), "site-c"); ok || status.Code(err) != codes.PermissionDenied {
		t.Errorf("another key: started=%v, %v", ok, err)
	}
	if err := gateway.CertificateNamesKey(context.Background(), "site-a"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("no certificate: %v", err)
	}
}

// waitAgent is closed once the gateway has a tunnel with key, or ctx ends.
func waitAgent(ctx context.Context, g *gateway.Gateway, key string) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		_ = g.Agent(key).WaitForReady(ctx)
	}()
	return ch
}
