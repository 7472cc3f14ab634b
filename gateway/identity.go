package gateway

import (
	"context"
	"crypto/x509"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
)

// CertificateNamesKey is an AuthorizeAgent function for gateways that
// require client certificates: an agent may announce only a key its
// verified certificate names, as its subject's common name or one of its
// DNS names. It ties each key to an identity, so that an agent cannot join
// another agent's key and take a share of its calls. Use it with a server
// whose TLS configuration verifies client certificates
// (tls.RequireAndVerifyClientCert); without a verified certificate every
// tunnel is refused.
func CertificateNamesKey(ctx context.Context, key string) error {
	cert := verifiedCertificate(ctx)
	if cert == nil {
		return status.Error(codes.Unauthenticated, "grpctunnel gateway: an agent must present a verified client certificate")
	}
	if cert.Subject.CommonName == key || slices.Contains(cert.DNSNames, key) {
		return nil
	}
	return status.Errorf(codes.PermissionDenied, "grpctunnel gateway: the agent's certificate (%s) does not name key %s", cert.Subject, errtext.Quote(key))
}

// verifiedCertificate is the leaf of the peer's verified client
// certificate chain, or nil.
func verifiedCertificate(ctx context.Context) *x509.Certificate {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	return leaf(p.AuthInfo)
}

func leaf(info credentials.AuthInfo) *x509.Certificate {
	tlsInfo, ok := info.(credentials.TLSInfo)
	if !ok || len(tlsInfo.State.VerifiedChains) == 0 || len(tlsInfo.State.VerifiedChains[0]) == 0 {
		return nil
	}
	return tlsInfo.State.VerifiedChains[0][0]
}
