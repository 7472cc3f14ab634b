// Command secure shows the recommended way to deploy reverse tunnels: mutual
// TLS, with each tunnel's affinity key taken from the client's verified
// certificate.
//
// A gateway that accepts reverse tunnels faces the internet, and it routes
// its calls to devices by affinity key. If a device could choose its own key,
// say with a metadata header, any device could claim another's name and
// receive the calls meant for it. So the gateway here requires a client
// certificate issued by its device CA (tls.RequireAndVerifyClientCert), and
// its AffinityKey function returns the CommonName of the certificate that TLS
// verified, found through the tunnel's Context. Headers the device sends are
// ignored for routing: device-1 claims to be device-2 in a header, and the
// gateway still files its tunnel under device-1. A second device presents a
// certificate from a CA the gateway does not trust, naming itself device-1;
// the TLS handshake fails, so it never reaches the tunnel handler at all.
//
// The certificates are generated in memory when the program starts, to keep
// the example self-contained; in production they come from your PKI. Both
// sides run in this one process over loopback. The program prints what
// happens, shuts down cleanly and exits 0, or exits 1 with the reason if a
// step fails or takes too long.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// claimHeader is a header a device might use to name itself. The gateway
// prints it but never routes by it.
const claimHeader = "device-id"

func main() {
	// The timeout bounds the whole run, so a broken tunnel makes the example
	// fail rather than hang.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := run(ctx, os.Stdout); err != nil {
		cancel()
		fmt.Fprintln(os.Stderr, "secure example failed:", err)
		os.Exit(1)
	}
}

// run plays the gateway, a trusted device and an untrusted one, then shuts
// everything down. It writes its narration to w and returns once every
// goroutine it started has ended.
func run(ctx context.Context, w io.Writer) error {
	out := &printer{w: w}

	// The PKI: a device CA that the gateway trusts, which also signs the
	// gateway's own certificate, and a rogue CA that it does not.
	deviceCA, err := newAuthority("device CA")
	if err != nil {
		return err
	}
	rogueCA, err := newAuthority("rogue CA")
	if err != nil {
		return err
	}
	serverCert, err := deviceCA.issue("gateway", true)
	if err != nil {
		return err
	}
	device1Cert, err := deviceCA.issue("device-1", false)
	if err != nil {
		return err
	}
	rogueCert, err := rogueCA.issue("device-1", false)
	if err != nil {
		return err
	}
	out.printf("pki: generated a device CA with certificates for the gateway and device-1, and a rogue CA, all in memory (in production they come from your PKI)\n")

	// The gateway. TLS requires a client certificate signed by the device
	// CA, so by the time a tunnel exists its client is authenticated, and
	// the tunnel's Context holds the verified certificate.
	opened := make(chan struct{}, 1)
	closed := make(chan struct{}, 1)
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		AffinityKey: func(ch tunnel.TunnelChannel) any {
			if id, ok := verifiedDevice(ch.Context()); ok {
				return id
			}
			// Cannot happen under RequireAndVerifyClientCert. A nil key
			// keeps such a tunnel out of every device's group.
			return nil
		},
		OnReverseTunnelOpen: func(ch tunnel.TunnelChannel) {
			id, _ := verifiedDevice(ch.Context())
			md, _ := metadata.FromIncomingContext(ch.Context())
			out.printf("gateway: reverse tunnel opened; key %q from the verified certificate (the %s header said %q and is ignored)\n",
				id, claimHeader, strings.Join(md.Get(claimHeader), ","))
			opened <- struct{}{}
		},
		OnReverseTunnelClose: func(ch tunnel.TunnelChannel) {
			id, _ := verifiedDevice(ch.Context())
			out.printf("gateway: reverse tunnel of %s closed\n", id)
			closed <- struct{}{}
		},
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    deviceCA.pool,
		MinVersion:   tls.VersionTLS13,
	})))
	tunnelpb.RegisterTunnelServiceServer(server, handler.Service())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(lis)
	}()
	// Stop is idempotent, so this is a safety net for early returns; the
	// normal path stops the server itself, in order.
	defer func() {
		server.Stop()
		<-served
	}()
	out.printf("gateway: listening with TLS; client certificates from the device CA are required\n")

	// device-1 dials with its own certificate and opens a reverse tunnel.
	// Its header claims another device's name, to show that it gains
	// nothing by it.
	conn, err := dial(lis.Addr().String(), deviceCA.pool, device1Cert)
	if err != nil {
		return err
	}
	defer conn.Close()
	dev := &device{id: "device-1", out: out}
	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	demopb.RegisterDeviceServiceServer(rs, dev)
	type serveResult struct {
		started bool
		err     error
	}
	out.printf("device-1: dialling with its certificate (CN=device-1), sending %s: device-2\n", claimHeader)
	serveDone := make(chan serveResult, 1)
	go func() {
		started, err := rs.Serve(metadata.AppendToOutgoingContext(ctx, claimHeader, "device-2"))
		serveDone <- serveResult{started, err}
	}()
	// Another safety net: Stop makes Serve return, and waits for it.
	defer rs.Stop()

	toDevice1 := handler.KeyAsChannel("device-1")
	if err := toDevice1.WaitForReady(ctx); err != nil {
		select {
		case res := <-serveDone:
			return fmt.Errorf("device-1's tunnel never became ready: Serve returned started=%t err=%v", res.started, res.err)
		default:
			return fmt.Errorf("waiting for device-1's tunnel: %w", err)
		}
	}
	if err := wait(ctx, opened); err != nil {
		return err
	}

	out.printf("gateway -> device-1: GetStatus through KeyAsChannel(\"device-1\")\n")
	st, err := demopb.NewDeviceServiceClient(toDevice1).GetStatus(ctx, &demopb.GetStatusRequest{})
	if err != nil {
		return fmt.Errorf("GetStatus: %w", err)
	}
	out.printf("gateway <- device-1: served_by=%s state=%s\n", st.GetServedBy(), st.GetState())

	// The header did not make device-1 reachable as device-2.
	_, err = demopb.NewDeviceServiceClient(handler.KeyAsChannel("device-2")).GetStatus(ctx, &demopb.GetStatusRequest{})
	if err == nil {
		return errors.New("GetStatus on device-2 succeeded, but no device-2 has a tunnel")
	}
	out.printf("gateway -> device-2: GetStatus failed as expected: %s (a header cannot claim a key)\n", status.Code(err))

	// The rogue device has a certificate naming device-1, but from a CA
	// the gateway does not trust: the handshake fails and no tunnel opens.
	rogueConn, err := dial(lis.Addr().String(), deviceCA.pool, rogueCert)
	if err != nil {
		return err
	}
	out.printf("rogue: dialling with a certificate from an untrusted CA that says CN=device-1\n")
	rogue := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(rogueConn))
	demopb.RegisterDeviceServiceServer(rogue, &device{id: "rogue", out: out})
	started, err := rogue.Serve(ctx)
	rogue.Stop()
	if cerr := rogueConn.Close(); cerr != nil {
		return cerr
	}
	if started || err == nil {
		return fmt.Errorf("the rogue device's Serve returned started=%t err=%v; want a refusal", started, err)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	out.printf("rogue: tunnel refused: started=%t code=%s\n", started, status.Code(err))

	var ids []string
	for _, ch := range handler.AllReverseTunnels() {
		id, _ := verifiedDevice(ch.Context())
		ids = append(ids, id)
	}
	out.printf("gateway: reverse tunnels open: %s\n", strings.Join(ids, ", "))

	st, err = demopb.NewDeviceServiceClient(toDevice1).GetStatus(ctx, &demopb.GetStatusRequest{})
	if err != nil {
		return fmt.Errorf("GetStatus after the rogue attempt: %w", err)
	}
	out.printf("gateway <- device-1: served_by=%s calls_served=%d\n", st.GetServedBy(), st.GetCallsServed())

	// Shut down from the device's end: GracefulStop lets calls in progress
	// finish, closes the tunnel and waits for Serve to return.
	out.printf("device-1: stopping\n")
	rs.GracefulStop()
	res := <-serveDone
	if !res.started || res.err != nil {
		return fmt.Errorf("device-1's Serve ended with started=%t err=%v", res.started, res.err)
	}
	if err := wait(ctx, closed); err != nil {
		return err
	}
	if err := conn.Close(); err != nil {
		return err
	}
	server.Stop()
	<-served
	out.printf("done: only the holder of device-1's certificate was reachable as device-1\n")
	return nil
}

// verifiedDevice returns the CommonName of the client certificate that TLS
// verified for the RPC whose context is ctx, or false if there is none. It
// reads the verified chains, never the raw peer certificates: a certificate
// that no trusted CA vouched for names no one.
func verifiedDevice(ctx context.Context) (string, bool) {
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

// dial returns a connection to addr that trusts roots and presents cert.
func dial(addr string, roots *x509.CertPool, cert tls.Certificate) (*grpc.ClientConn, error) {
	return grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs:      roots,
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
	})))
}

// wait receives from ch, or fails once ctx is done.
func wait(ctx context.Context, ch <-chan struct{}) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// authority is a certificate authority made in memory for the example.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool // trusts this authority alone
}

func newAuthority(name string) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl, err := template(name)
	if err != nil {
		return nil, err
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &authority{cert: cert, key: key, pool: pool}, nil
}

// issue returns a certificate for cn signed by a: a server certificate for
// loopback, or a client certificate.
func (a *authority) issue(cn string, server bool) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl, err := template(cn)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// template is the common part of every certificate here: a random serial
// and an hour of validity either side of now.
func template(cn string) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}, nil
}

// device implements DeviceService on a device.
type device struct {
	demopb.UnimplementedDeviceServiceServer
	id    string
	out   *printer
	calls atomic.Int64
}

func (d *device) GetStatus(context.Context, *demopb.GetStatusRequest) (*demopb.GetStatusResponse, error) {
	n := d.calls.Add(1)
	d.out.printf("%s: handling GetStatus\n", d.id)
	return &demopb.GetStatusResponse{ServedBy: d.id, State: "online", CallsServed: n}, nil
}

// printer serialises writes to w: the gateway, the devices and the tunnel
// callbacks all narrate from different goroutines.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *printer) printf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format, args...)
}
