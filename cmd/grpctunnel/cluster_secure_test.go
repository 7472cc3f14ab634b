package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// TestClusterWithTLS: two replicas with the files of grpctunnel certs
// (mutual TLS for agents and callers, one CA) forward calls to each
// other over mutual TLS on their peer ports. A caller's certificate from
// the same CA, with the cluster's token, does not get through a peer
// port: it is not a replica's; a replica's certificate does.
func TestClusterWithTLS(t *testing.T) {
	ctx := testContext(t)
	dir := filepath.Join(t.TempDir(), "certs")
	file := func(name string) string { return filepath.Join(dir, name) }
	if p := startInProcess(t, runCerts, "--dir", dir, "--agents", "site-a", "--callers", "operator"); p.stop(t) != 0 {
		t.Fatalf("grpctunnel certs failed:\n%s", p.stderr.String())
	}
	etcd, err := embedetcd.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Stop)
	token := writeFile(t, t.TempDir(), "cluster-token", []byte("the-replicas-secret\n"))

	var addrs, peerAddrs []string
	var first *inProcess
	for _, id := range []string{"gw-1", "gw-2"} {
		gw := startInProcess(t, runGateway, "--listen", "127.0.0.1:0", "--log-format", "json",
			"--tls-cert", file("gateway.crt"), "--tls-key", file("gateway.key"), "--client-ca", file("ca.crt"),
			"--etcd", etcd.URL, "--replica-id", id, "--peer-listen", "127.0.0.1:0", "--cluster-token-file", token)
		joined := gw.stderr.waitMsg(t, ctx, "replica joined the cluster")
		if joined["peer_tls"] != true {
			t.Errorf("%s: peer port without TLS: %v", id, joined)
		}
		peer, _ := joined["peer_listen"].(string)
		addr, _ := gw.stderr.waitMsg(t, ctx, "listening")["addr"].(string)
		addrs, peerAddrs = append(addrs, addr), append(peerAddrs, peer)
		if first == nil {
			first = gw
		}
	}
	target := startTarget(t, "secure-device")
	startInProcess(t, runAgent, "--gateway", addrs[0], "--key", "site-a", "--target", target, "--log-format", "json",
		"--ca", file("ca.crt"), "--tls-cert", file("agent-site-a.crt"), "--tls-key", file("agent-site-a.key"))

	// A caller of replica 2 reaches the agent on replica 1.
	ca := &testCA{pemFile: file("ca.crt")}
	routes(t, ctx, dialTLS(t, addrs[1], ca, file("caller-operator.crt"), file("caller-operator.key")), "site-a")

	// On replica 1's peer port, with the cluster's token: a caller's
	// certificate is refused in the handshake, a replica's is admitted.
	call := func(certFile, keyFile string) error {
		cfg, err := clientTLS(file("ca.crt"), certFile, keyFile, "")
		if err != nil {
			t.Fatal(err)
		}
		conn, err := grpc.NewClient(peerAddrs[0], grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		callCtx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "site-a", gateway.PeerHeader, "the-replicas-secret"), 5*time.Second)
		defer cancel()
		_, err = demopb.NewDeviceServiceClient(conn).GetStatus(callCtx, &demopb.GetStatusRequest{})
		return err
	}
	if err := call(file("caller-operator.crt"), file("caller-operator.key")); err == nil {
		t.Error("a caller's certificate with the cluster's token got through a peer port")
	}
	refusal := first.stderr.waitMsg(t, ctx, "TLS handshake refused")
	t.Logf("replica 1 logged: %v", refusal)
	if err := call(file("gateway.crt"), file("gateway.key")); err != nil {
		t.Errorf("a replica's certificate on the peer port: %v", err)
	}
}
