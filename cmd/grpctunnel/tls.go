package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc/credentials"
)

// serverTLS is the gateway's TLS configuration: its certificate and, with
// clientCAFile, mutual TLS that admits only clients holding a certificate
// issued by one of the CAs in that file.
func serverTLS(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	cert, err := loadKeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clientCAFile != "" {
		pool, err := loadCAs(clientCAFile)
		if err != nil {
			return nil, err
		}
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = pool
	}
	return cfg, nil
}

// clientTLS is the agent's TLS configuration for the gateway: it trusts the
// CAs in caFile (the system's if empty), presents the certificate in
// certFile and keyFile if given, and expects the gateway's certificate to
// name serverName if given (the host of the address otherwise).
func clientTLS(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	cfg := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := loadCAs(caFile)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	if certFile != "" {
		cert, err := loadKeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// loadCAs reads a file of PEM certificates into a pool.
func loadCAs(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading CA certificates: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("reading CA certificates: %s holds no PEM certificate", file)
	}
	return pool, nil
}

// loadKeyPair loads a certificate and its key, with an error that names
// both files: tls.LoadX509KeyPair's own says what is wrong ("private key
// does not match public key") but not with which files, which an operator
// rotating several needs to know.
func loadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading the TLS certificate %s with key %s: %w", certFile, keyFile, err)
	}
	return cert, nil
}

// describeTLS is the log's account of cfg's certificate, if it has one:
// its subject and expiry, which are what an operator checks after a
// rotation. prefix names the attributes ("cert" for the gateway's own,
// "client_cert" for the agent's).
func describeTLS(cfg *tls.Config, prefix string) []any {
	if len(cfg.Certificates) == 0 || cfg.Certificates[0].Leaf == nil {
		return nil
	}
	leaf := cfg.Certificates[0].Leaf
	return []any{prefix + "_subject", leaf.Subject.String(), prefix + "_expires", leaf.NotAfter.UTC().Format(time.RFC3339)}
}

// reloadingTLS is TLS transport credentials whose configuration a reload
// may replace: every handshake builds gRPC's own TLS credentials from the
// configuration current at that moment, so that new connections use the
// new certificate, key and CA pool while connections already open keep
// theirs.
//
// The agent could instead set InsecureSkipVerify and verify the gateway's
// certificate itself in VerifyPeerCertificate against the current pool,
// but that reimplements what crypto/tls does (chains, host names, key
// usages), and a slip there accepts any certificate. The gateway could use
// GetConfigForClient, but this one mechanism serves both ends, through the
// same code as credentials.NewTLS. Building those credentials per
// handshake costs a configuration clone, nothing next to the handshake.
type reloadingTLS struct{ cfg *reloadable[tls.Config] }

// ClientHandshake implements credentials.TransportCredentials with the
// current configuration.
func (c reloadingTLS) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return credentials.NewTLS(c.cfg.load()).ClientHandshake(ctx, authority, conn)
}

// ServerHandshake implements credentials.TransportCredentials with the
// current configuration.
func (c reloadingTLS) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return credentials.NewTLS(c.cfg.load()).ServerHandshake(conn)
}

// Info implements credentials.TransportCredentials: that of gRPC's TLS
// credentials.
func (c reloadingTLS) Info() credentials.ProtocolInfo {
	return credentials.NewTLS(c.cfg.load()).Info()
}

// Clone implements credentials.TransportCredentials. The clone shares the
// holder, so that a reload reaches the connections gRPC makes with it too.
func (c reloadingTLS) Clone() credentials.TransportCredentials { return c }

// OverrideServerName implements credentials.TransportCredentials. gRPC no
// longer calls it, and honouring it would mean a per-clone configuration
// that a reload then overwrites: --server-name is the way.
func (c reloadingTLS) OverrideServerName(string) error {
	return errors.New("grpctunnel: reloadable TLS credentials take no server name override")
}
