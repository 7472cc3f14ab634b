package tunnel

// Security tests: tunnels authenticated through gRPC's standard mechanisms
// (TLS, mutual TLS, per-RPC credentials, interceptors on the opening RPC),
// affinity keys derived from the authenticated identity, and reserved
// headers that a caller cannot use to steer the handler. The certificates
// are made in memory for each test; none is committed.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// secTimeout bounds every wait in these tests, so that a broken tunnel fails
// the test instead of hanging it. Nothing waits for it to pass.
const secTimeout = 10 * time.Second

// secCA is a throwaway certificate authority.
type secCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool // trusts this CA alone
}

func secKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func secSerial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// secNewCA makes a self-signed CA named name, valid for an hour either side
// of now.
func secNewCA(t testing.TB, name string) *secCA {
	t.Helper()
	key := secKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          secSerial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &secCA{cert: cert, key: key, pool: pool}
}

// serverCert issues a server certificate for 127.0.0.1, ::1 and localhost.
func (ca *secCA) serverCert(t testing.TB) tls.Certificate {
	t.Helper()
	return ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "tunnel server"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
}

// clientCert issues a client certificate whose CommonName is cn.
func (ca *secCA) clientCert(t testing.TB, cn string) tls.Certificate {
	t.Helper()
	return ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
}

func (ca *secCA) issue(t testing.TB, tmpl *x509.Certificate) tls.Certificate {
	t.Helper()
	key := secKey(t)
	tmpl.SerialNumber = secSerial(t)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// secServerTLS is the server's TLS configuration. With clients set, the
// server requires a client certificate issued by clients.
func secServerTLS(cert tls.Certificate, clients *x509.CertPool) *tls.Config {
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clients != nil {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = clients
	}
	return cfg
}

// secClientTLS is a client's TLS configuration: it trusts roots and, if
// given, presents cert.
func secClientTLS(roots *x509.CertPool, cert ...tls.Certificate) *tls.Config {
	return &tls.Config{RootCAs: roots, Certificates: cert, MinVersion: tls.VersionTLS12}
}

// secServer is a gRPC server with TLS on loopback and a tunnel handler.
type secServer struct {
	handler *TunnelServiceHandler
	addr    string
}

// secStartServer starts a TLS gRPC server configured by cfg, with a tunnel
// handler that serves reg's services on forward tunnels. It is stopped at
// cleanup.
func secStartServer(t testing.TB, cfg *tls.Config, opts TunnelServiceHandlerOptions, reg registrar, serverOpts ...grpc.ServerOption) *secServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &secServer{handler: NewTunnelServiceHandler(opts), addr: lis.Addr().String()}
	if reg != nil {
		reg(s.handler)
	}
	server := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(cfg))}, serverOpts...)...)
	tunnelpb.RegisterTunnelServiceServer(server, s.handler.Service())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(lis)
	}()
	t.Cleanup(func() {
		server.Stop()
		<-served
	})
	return s
}

// secDial returns a tunnel service stub for a connection to addr over TLS
// configured by cfg. The connection is closed at cleanup.
func secDial(t testing.TB, addr string, cfg *tls.Config) tunnelpb.TunnelServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return tunnelpb.NewTunnelServiceClient(conn)
}

// secContext is a context that ends with the test or after secTimeout.
func secContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), secTimeout)
	t.Cleanup(cancel)
	return ctx
}

type secServeResult struct {
	started bool
	err     error
}

// secServe runs one Serve of a new reverse tunnel server with reg's
// services, over stub, and reports its result on the returned channel. The
// server is stopped at cleanup.
func secServe(t testing.TB, ctx context.Context, stub tunnelpb.TunnelServiceClient, reg registrar, opts ...grpc.CallOption) <-chan secServeResult {
	t.Helper()
	rs := NewReverseTunnelServer(stub)
	if reg != nil {
		reg(rs)
	}
	res := make(chan secServeResult, 1)
	go func() {
		started, err := rs.Serve(ctx, opts...)
		res <- secServeResult{started, err}
	}()
	t.Cleanup(rs.Stop)
	return res
}

// secRefused waits for a Serve that must fail to open its tunnel, and
// checks that it failed with code.
func secRefused(t testing.TB, res <-chan secServeResult, code codes.Code) {
	t.Helper()
	select {
	case r := <-res:
		if r.started || status.Code(r.err) != code {
			t.Fatalf("Serve = (%v, %v); want (false, %v)", r.started, r.err, code)
		}
	case <-time.After(secTimeout):
		t.Fatal("Serve did not return")
	}
}

// secReady waits until cc has a tunnel.
func secReady(t testing.TB, cc ReverseClientConnInterface) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), secTimeout)
	defer cancel()
	if err := cc.WaitForReady(ctx); err != nil {
		t.Fatalf("no tunnel became ready: %v", err)
	}
}

func secUnary(ctx context.Context, cc grpc.ClientConnInterface, opts ...grpc.CallOption) (string, error) {
	out := new(wrapperspb.BytesValue)
	err := cc.Invoke(ctx, probeUnary, bytesValue(nil), out, opts...)
	return string(out.GetValue()), err
}

func secWantCode(t testing.TB, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got error %v; want code %v", err, code)
	}
}

// secProbe returns services whose probe answers every unary call with
// answer(ctx).
func secProbe(answer func(ctx context.Context) string) registrar {
	return testServices(&probe{unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		return bytesValue([]byte(answer(ctx))), nil
	}})
}

// secNamed returns services whose probe answers with name.
func secNamed(name string) registrar {
	return secProbe(func(context.Context) string { return name })
}

// secAuthType is the auth type of the peer in ctx, "none" if it has none.
func secAuthType(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return "none"
	}
	return p.AuthInfo.AuthType()
}

// secCertIdentity returns the CommonName of the verified client certificate
// of the peer in ctx. It reads the verified chains only: a certificate the
// TLS stack did not verify names no one.
func secCertIdentity(ctx context.Context) (string, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return "", false
	}
	return info.State.VerifiedChains[0][0].Subject.CommonName, true
}

// TestSecTLS opens forward and reverse tunnels over TLS, and checks that the
// tunneled handlers see the TLS peer of the opening RPC.
func TestSecTLS(t *testing.T) {
	ca := secNewCA(t, "test CA")
	srv := secStartServer(t, secServerTLS(ca.serverCert(t), nil), TunnelServiceHandlerOptions{},
		secProbe(secAuthType))
	stub := secDial(t, srv.addr, secClientTLS(ca.pool))
	ctx := secContext(t)

	t.Run("forward", func(t *testing.T) {
		ch, err := NewChannel(stub).Start(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		if got, err := secUnary(ctx, ch); err != nil || got != "tls" {
			t.Fatalf("handler saw auth %q, %v; want tls", got, err)
		}
	})
	t.Run("reverse", func(t *testing.T) {
		secServe(t, ctx, stub, secProbe(secAuthType))
		secReady(t, srv.handler.AsChannel())
		if got, err := secUnary(ctx, srv.handler.AsChannel()); err != nil || got != "tls" {
			t.Fatalf("handler saw auth %q, %v; want tls", got, err)
		}
	})
}

// TestSecTLSUntrustedServer checks that a client that does not trust the
// server's CA opens no tunnel in either direction.
func TestSecTLSUntrustedServer(t *testing.T) {
	ca := secNewCA(t, "test CA")
	other := secNewCA(t, "another CA")
	opened := make(chan TunnelChannel, 1)
	srv := secStartServer(t, secServerTLS(ca.serverCert(t), nil), TunnelServiceHandlerOptions{
		OnReverseTunnelOpen: func(ch TunnelChannel) { opened <- ch },
	}, secNamed("server"))
	stub := secDial(t, srv.addr, secClientTLS(other.pool))
	ctx := secContext(t)

	ch, err := NewChannel(stub).Start(ctx)
	if ch != nil || err == nil {
		t.Fatalf("Start = (%v, %v); want no tunnel and an error", ch, err)
	}
	secWantCode(t, err, codes.Unavailable)

	secRefused(t, secServe(t, ctx, stub, secNamed("device")), codes.Unavailable)
	if n := len(srv.handler.AllReverseTunnels()); n != 0 {
		t.Fatalf("%d reverse tunnels open; want none", n)
	}
	if len(opened) != 0 {
		t.Fatal("OnReverseTunnelOpen ran for a client that never got through TLS")
	}
}

// TestSecMTLSAffinityFromCertificate requires client certificates and keys
// reverse tunnels by the verified certificate's CommonName: a device is
// reachable by its own name only, whatever headers it sends, and a client
// without a trusted certificate opens no tunnel at all.
func TestSecMTLSAffinityFromCertificate(t *testing.T) {
	ca := secNewCA(t, "device CA")
	rogueCA := secNewCA(t, "rogue CA")

	var mu sync.Mutex
	var keyed []string   // keys handed out, in order
	var claimed []string // what the device-id header said, in the same order
	srv := secStartServer(t, secServerTLS(ca.serverCert(t), ca.pool), TunnelServiceHandlerOptions{
		AffinityKey: func(ch TunnelChannel) any {
			md, _ := metadata.FromIncomingContext(ch.Context())
			id, ok := secCertIdentity(ch.Context())
			mu.Lock()
			defer mu.Unlock()
			keyed = append(keyed, id)
			claimed = append(claimed, strings.Join(md.Get("device-id"), ","))
			if !ok {
				return nil // unreachable under RequireAndVerifyClientCert
			}
			return id
		},
	}, secNamed("server"))
	ctx := secContext(t)
	dial := func(t *testing.T, cert ...tls.Certificate) tunnelpb.TunnelServiceClient {
		return secDial(t, srv.addr, secClientTLS(ca.pool, cert...))
	}

	// device-a's certificate says device-a; its header claims device-b.
	stubA := dial(t, ca.clientCert(t, "device-a"))
	secServe(t, metadata.AppendToOutgoingContext(ctx, "device-id", "device-b"), stubA, secNamed("a"))
	toA, toB := srv.handler.KeyAsChannel("device-a"), srv.handler.KeyAsChannel("device-b")
	secReady(t, toA)
	mu.Lock()
	if !slices.Equal(keyed, []string{"device-a"}) || !slices.Equal(claimed, []string{"device-b"}) {
		t.Fatalf("keys %q from headers %q; want the certificate's device-a whatever the header says", keyed, claimed)
	}
	mu.Unlock()
	if toB.Ready() {
		t.Fatal("device-a's header made it reachable as device-b")
	}
	_, err := secUnary(ctx, toB)
	secWantCode(t, err, codes.Unavailable)

	// The real device-b gets its own key; each key reaches its own device.
	stubB := dial(t, ca.clientCert(t, "device-b"))
	secServe(t, ctx, stubB, secNamed("b"))
	secReady(t, toB)
	for range 4 {
		for cc, want := range map[grpc.ClientConnInterface]string{toA: "a", toB: "b"} {
			if got, err := secUnary(ctx, cc); err != nil || got != want {
				t.Fatalf("got %q, %v; want %q", got, err, want)
			}
		}
	}

	// Neither a client without a certificate nor one whose certificate
	// comes from another CA gets through, forward or reverse, even when the
	// certificate names a known device.
	for _, tc := range []struct {
		name string
		stub tunnelpb.TunnelServiceClient
	}{
		{"no certificate", dial(t)},
		{"untrusted certificate", dial(t, rogueCA.clientCert(t, "device-a"))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch, err := NewChannel(tc.stub).Start(ctx)
			if ch != nil || err == nil {
				t.Fatalf("Start = (%v, %v); want no tunnel and an error", ch, err)
			}
			secWantCode(t, err, codes.Unavailable)
			secRefused(t, secServe(t, ctx, tc.stub, secNamed("rogue")), codes.Unavailable)
		})
	}
	var ids []string
	for _, ch := range srv.handler.AllReverseTunnels() {
		id, _ := secCertIdentity(ch.Context())
		ids = append(ids, id)
	}
	if !slices.Equal(ids, []string{"device-a", "device-b"}) {
		t.Fatalf("reverse tunnels of %q; want device-a and device-b only", ids)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(keyed) != 2 {
		t.Fatalf("AffinityKey ran for %q; want only the two trusted devices", keyed)
	}
	for range 4 {
		if got, err := secUnary(ctx, toA); err != nil || got != "a" {
			t.Fatalf("after the rejected clients, device-a's key reached %q, %v", got, err)
		}
	}
}

// secIdentityKey is the context key under which secBearerAuth stores the
// authenticated identity.
type secIdentityKey struct{}

// secBearerAuth is a stream interceptor for the *grpc.Server: it lets a
// tunnel open only with a known bearer token, and stores the token's
// identity in the context that the tunnel, its AffinityKey function and its
// handlers inherit.
func secBearerAuth(tokens map[string]string) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !strings.HasPrefix(info.FullMethod, "/"+tunnelpb.TunnelService_ServiceDesc.ServiceName+"/") {
			return handler(srv, ss)
		}
		md, _ := metadata.FromIncomingContext(ss.Context())
		auth := md.Get("authorization")
		if len(auth) != 1 {
			return status.Error(codes.Unauthenticated, "a tunnel needs a bearer token")
		}
		token, ok := strings.CutPrefix(auth[0], "Bearer ")
		id, known := tokens[token]
		if !ok || !known {
			return status.Error(codes.Unauthenticated, "unknown bearer token")
		}
		return handler(srv, &secAuthedStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), secIdentityKey{}, id)})
	}
}

type secAuthedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *secAuthedStream) Context() context.Context { return s.ctx }

// secBearer is per-RPC credentials carrying a bearer token. Like real token
// credentials it insists on a secure transport.
type secBearer struct{ token string }

func (b secBearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (secBearer) RequireTransportSecurity() bool { return true }

// TestSecPerRPCCredentialsOnOpeningRPC authenticates tunnels with a bearer
// token on the opening RPC, checked by an interceptor on the *grpc.Server,
// and derives reverse tunnels' affinity keys from the identity it stores.
func TestSecPerRPCCredentialsOnOpeningRPC(t *testing.T) {
	ca := secNewCA(t, "test CA")
	tokens := map[string]string{"token-a": "client-a", "token-b": "client-b"}
	var keyed atomic.Int32 // AffinityKey calls
	srv := secStartServer(t, secServerTLS(ca.serverCert(t), nil), TunnelServiceHandlerOptions{
		AffinityKey: func(ch TunnelChannel) any {
			keyed.Add(1)
			id, _ := ch.Context().Value(secIdentityKey{}).(string)
			return id
		},
	}, secProbe(func(ctx context.Context) string {
		// The interceptor's value, the opening RPC's metadata, and the
		// tunneled call's own metadata, which carries no credentials.
		opening, _ := TunnelMetadataFromIncomingContext(ctx)
		own, _ := metadata.FromIncomingContext(ctx)
		return fmt.Sprintf("%v|%v|%v|%v", ctx.Value(secIdentityKey{}), opening.Get("authorization"), opening.Get("x-app"), own.Get("authorization"))
	}), grpc.StreamInterceptor(secBearerAuth(tokens)))
	stub := secDial(t, srv.addr, secClientTLS(ca.pool))
	ctx := secContext(t)

	t.Run("forward", func(t *testing.T) {
		ch, err := NewChannel(stub).Start(metadata.AppendToOutgoingContext(ctx, "x-app", "demo"), grpc.PerRPCCredentials(secBearer{"token-a"}))
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		want := "client-a|[Bearer token-a]|[demo]|[]"
		if got, err := secUnary(ctx, ch); err != nil || got != want {
			t.Fatalf("handler saw %q, %v; want %q", got, err, want)
		}
	})
	t.Run("forward refused", func(t *testing.T) {
		for _, opts := range [][]grpc.CallOption{{grpc.PerRPCCredentials(secBearer{"token-x"})}, nil} {
			ch, err := NewChannel(stub).Start(ctx, opts...)
			if ch != nil {
				t.Fatal("a tunnel opened without a valid token")
			}
			secWantCode(t, err, codes.Unauthenticated)
		}
	})
	t.Run("reverse", func(t *testing.T) {
		secServe(t, ctx, stub, secNamed("b"), grpc.PerRPCCredentials(secBearer{"token-b"}))
		cc := srv.handler.KeyAsChannel("client-b")
		secReady(t, cc)
		if got, err := secUnary(ctx, cc); err != nil || got != "b" {
			t.Fatalf("got %q, %v; want b", got, err)
		}
		if n := keyed.Load(); n != 1 {
			t.Fatalf("AffinityKey ran %d times; want once", n)
		}

		// Neither a wrong token nor none opens a tunnel; the handler never
		// sees either attempt.
		secRefused(t, secServe(t, ctx, stub, secNamed("x"), grpc.PerRPCCredentials(secBearer{"token-x"})), codes.Unauthenticated)
		secRefused(t, secServe(t, ctx, stub, secNamed("x")), codes.Unauthenticated)
		if n := keyed.Load(); n != 1 {
			t.Fatalf("AffinityKey ran %d times; want once, for the authenticated tunnel", n)
		}
		if n := len(srv.handler.AllReverseTunnels()); n != 1 {
			t.Fatalf("%d reverse tunnels after the refusals; want 1", n)
		}
		if got, err := secUnary(ctx, srv.handler.AsChannel()); err != nil || got != "b" {
			t.Fatalf("got %q, %v; want b", got, err)
		}
	})
}

// TestSecPerRPCCredentialsOnTunneledCalls checks that credentials which
// require transport security can be used on calls through a tunnel whose
// connection is TLS: the tunnel reports the connection's security.
func TestSecPerRPCCredentialsOnTunneledCalls(t *testing.T) {
	ca := secNewCA(t, "test CA")
	authz := secProbe(func(ctx context.Context) string {
		md, _ := metadata.FromIncomingContext(ctx)
		return strings.Join(md.Get("authorization"), ",")
	})
	srv := secStartServer(t, secServerTLS(ca.serverCert(t), nil), TunnelServiceHandlerOptions{}, authz)
	stub := secDial(t, srv.addr, secClientTLS(ca.pool))
	ctx := secContext(t)

	fwd, err := NewChannel(stub).Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer fwd.Close()
	secServe(t, ctx, stub, authz)
	secReady(t, srv.handler.AsChannel())

	for name, cc := range map[string]grpc.ClientConnInterface{"forward": fwd, "reverse": srv.handler.AsChannel()} {
		t.Run(name, func(t *testing.T) {
			got, err := secUnary(ctx, cc, grpc.PerRPCCredentials(secBearer{"inner"}))
			if err != nil || got != "Bearer inner" {
				t.Fatalf("handler saw authorization %q, %v; want Bearer inner", got, err)
			}
		})
	}
}

// TestSecReservedHeadersCannotSetDeadline checks, over TLS, that a caller
// cannot give the handler a deadline, or shorten the one it has, by putting
// grpc-timeout or other reserved headers in its metadata.
func TestSecReservedHeadersCannotSetDeadline(t *testing.T) {
	ca := secNewCA(t, "test CA")
	seen := secProbe(func(ctx context.Context) string {
		md, _ := metadata.FromIncomingContext(ctx)
		var got []string
		for _, k := range []string{"grpc-timeout", "grpc-status", "content-type", "te", ":authority", "x-ok"} {
			if len(md.Get(k)) > 0 {
				got = append(got, k)
			}
		}
		deadline, ok := ctx.Deadline()
		switch {
		case !ok:
			got = append(got, "no deadline")
		case time.Until(deadline) > time.Minute:
			got = append(got, "caller's deadline")
		default:
			got = append(got, "shortened deadline")
		}
		return strings.Join(got, ",")
	})
	srv := secStartServer(t, secServerTLS(ca.serverCert(t), nil), TunnelServiceHandlerOptions{}, seen)
	stub := secDial(t, srv.addr, secClientTLS(ca.pool))
	// A tunnel's handlers inherit the deadline of the RPC that opened it,
	// so these tunnels are opened without one.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	fwd, err := NewChannel(stub).Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer fwd.Close()
	secServe(t, ctx, stub, seen)
	secReady(t, srv.handler.AsChannel())

	for name, cc := range map[string]grpc.ClientConnInterface{"forward": fwd, "reverse": srv.handler.AsChannel()} {
		t.Run(name, func(t *testing.T) {
			reserved := metadata.AppendToOutgoingContext(context.Background(),
				"grpc-timeout", "1n", "grpc-status", "13", "content-type", "application/grpc+json",
				"te", "gzip", ":authority", "elsewhere", "x-ok", "1")
			if got, err := secUnary(reserved, cc); err != nil || got != "x-ok,no deadline" {
				t.Fatalf("handler saw %q, %v; want x-ok,no deadline", got, err)
			}
			long, cancel := context.WithTimeout(reserved, time.Hour)
			defer cancel()
			if got, err := secUnary(long, cc); err != nil || got != "x-ok,caller's deadline" {
				t.Fatalf("handler saw %q, %v; want x-ok,caller's deadline", got, err)
			}
		})
	}
}
