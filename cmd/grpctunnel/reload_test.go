package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/loopback"
)

// TestReloadAllOrNothing: a reload installs every item or, when one fails,
// none, and logs one line either way.
func TestReloadAllOrNothing(t *testing.T) {
	logs := newLogBuffer()
	r := &reloader{log: slog.New(slog.NewJSONHandler(logs, nil))}
	a, b := newReloadable(new("a1")), newReloadable(new("b1"))
	nextA, nextB := "a2", "b2"
	var failB error
	addReloadable(r, "a", a, func() (*string, error) { return &nextA, nil }, func(s *string) []any { return []any{"a", *s} })
	addReloadable(r, "b", b, func() (*string, error) { return &nextB, failB }, func(s *string) []any { return []any{"b", *s} })

	failB = errors.New("b.pem: garbage")
	if err := r.reload(); err == nil || !strings.Contains(err.Error(), "b: b.pem: garbage") {
		t.Fatalf("reload with a bad b = %v, want b's error", err)
	}
	if *a.load() != "a1" || *b.load() != "b1" {
		t.Errorf("after a refused reload: a=%s b=%s, want a1 b1", *a.load(), *b.load())
	}
	ctx := testContext(t)
	if rec := logs.waitMsg(t, ctx, "reload refused: kept the certificates and tokens in use"); rec["err"] != "b: b.pem: garbage" {
		t.Errorf("the refusal logged %v", rec)
	}

	failB = nil
	if err := r.reload(); err != nil {
		t.Fatal(err)
	}
	if *a.load() != "a2" || *b.load() != "b2" {
		t.Errorf("after a reload: a=%s b=%s, want a2 b2", *a.load(), *b.load())
	}
	if rec := logs.waitMsg(t, ctx, "reloaded: new connections, tunnels and calls use it; those open keep going"); rec["a"] != "a2" || rec["b"] != "b2" {
		t.Errorf("the reload logged %v", rec)
	}
}

// TestReloadingBearer: the agent's tunnels send the token current when
// they open.
func TestReloadingBearer(t *testing.T) {
	current := newReloadable(new("old-token"))
	creds := reloadingBearer{token: current}
	current.p.Store(new("new-token"))
	md, err := creds.GetRequestMetadata(context.Background())
	if err != nil || md["authorization"] != "Bearer new-token" {
		t.Errorf("GetRequestMetadata after a reload = %v, %v; want Bearer new-token", md, err)
	}
}

// echoDesc is a bidirectional stream that echoes each message and ends OK
// when the caller closes its side: a call that stays open for as long as
// the test wants, through rotations.
var echoDesc = grpc.ServiceDesc{
	ServiceName: "grpctunnel.test.Echo",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Chat",
		ServerStreams: true,
		ClientStreams: true,
		Handler: func(_ any, ss grpc.ServerStream) error {
			for {
				m := new(wrapperspb.StringValue)
				if err := ss.RecvMsg(m); errors.Is(err, io.EOF) {
					return nil
				} else if err != nil {
					return err
				}
				if err := ss.SendMsg(m); err != nil {
					return err
				}
			}
		},
	}},
}

// startEchoTarget serves echoDesc on loopback until the end of the test.
func startEchoTarget(t *testing.T) string {
	t.Helper()
	srv := grpc.NewServer()
	srv.RegisterService(&echoDesc, struct{}{})
	return loopback.ServeAddr(t, srv)
}

// echo sends text on the stream and checks that it comes back.
func echo(t *testing.T, s grpc.ClientStream, text string) {
	t.Helper()
	if err := s.SendMsg(wrapperspb.String(text)); err != nil {
		t.Fatalf("sending %q: %v", text, err)
	}
	got := new(wrapperspb.StringValue)
	if err := s.RecvMsg(got); err != nil || got.GetValue() != text {
		t.Fatalf("echo of %q = %q, %v", text, got.GetValue(), err)
	}
}

// waitCount waits until the log holds n records with message msg, and
// returns the last.
func waitCount(t *testing.T, ctx context.Context, logs *logBuffer, msg string, n int) map[string]any {
	t.Helper()
	for {
		recs, changed := logs.records()
		var seen []map[string]any
		for _, r := range recs {
			if r["msg"] == msg {
				seen = append(seen, r)
			}
		}
		if len(seen) >= n {
			return seen[n-1]
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("not %d log records %q before %v; the log:\n%s", n, msg, ctx.Err(), logs.String())
		}
	}
}

// concat returns the contents of files, one after the other.
func concat(t *testing.T, files ...string) []byte {
	t.Helper()
	var all []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	return all
}

// TestReloadOnSIGHUP runs the gateway and the agent as processes and
// rotates, with a call in progress through them, the gateway's certificate
// to one from a new CA and the agent's token to a new one, by SIGHUP; then
// offers the gateway bad files, which it refuses.
func TestReloadOnSIGHUP(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test signals the processes with SIGHUP")
	}
	bin := buildCommand(t)
	ctx := testContext(t)
	dir := t.TempDir()
	const (
		reloaded = "reloaded: new connections, tunnels and calls use it; those open keep going"
		refused  = "reload refused: kept the certificates and tokens in use"
	)

	oldCA, newCA := newTestCA(t, "old"), newTestCA(t, "new")
	oldCert, oldKey := oldCA.serverCert(t)
	newCertFile, newKeyFile := newCA.serverCert(t)
	// Read now: a later certificate of the same CA overwrites the files.
	newCert, newKey := concat(t, newCertFile), concat(t, newKeyFile)
	// The gateway reads its certificate from these paths, which the
	// rotation overwrites, as a certificate manager would.
	gwCert := writeFile(t, dir, "gateway.pem", concat(t, oldCert))
	gwKey := writeFile(t, dir, "gateway-key.pem", concat(t, oldKey))
	gwTokens := writeFile(t, dir, "tokens", []byte("old-token\n"))
	agentCA := writeFile(t, dir, "agent-ca.pem", concat(t, oldCA.pemFile))
	agentToken := writeFile(t, dir, "agent-token", []byte("old-token\n"))
	agentCert, agentKey := oldCA.clientCert(t, "sensor-1")
	callerCert, callerKey := oldCA.clientCert(t, "operator")

	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json",
		"--tls-cert", gwCert, "--tls-key", gwKey, "--client-ca", oldCA.pemFile, "--token-file", gwTokens)
	addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	agentArgs := func(key, token string) []string {
		return []string{"agent", "--gateway", addr, "--key", key, "--target", startEchoTarget(t), "--log-format", "json", "--tunnels", "1",
			"--ca", agentCA, "--tls-cert", agentCert, "--tls-key", agentKey, "--token-file", token}
	}
	ag := startProcess(t, "agent", bin, agentArgs("sensor-1", agentToken)...)

	// A caller that trusts only the CA in caFile.
	caller := func(caFile string) *grpc.ClientConn {
		cfg, err := clientTLS(caFile, callerCert, callerKey, "")
		if err != nil {
			t.Fatal(err)
		}
		return dial(t, addr, credentials.NewTLS(cfg))
	}
	oldConn := caller(oldCA.pemFile)
	before := waitAgent(t, ctx, oldConn, "sensor-1", 1).GetTunnels()[0]

	// The call in progress, on a connection made with the old certificate.
	stream, err := oldConn.NewStream(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "sensor-1"), &echoDesc.Streams[0], "/grpctunnel.test.Echo/Chat")
	if err != nil {
		t.Fatal(err)
	}
	echo(t, stream, "before the rotation")

	// The agent first: it trusts both CAs and sends the new token, which
	// the gateway accepts beside the old one.
	writeFile(t, dir, "agent-ca.pem", concat(t, oldCA.pemFile, newCA.pemFile))
	writeFile(t, dir, "agent-token", []byte("new-token\n"))
	writeFile(t, dir, "tokens", []byte("old-token\nnew-token\n"))
	if err := ag.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if rec := waitCount(t, ctx, ag.log, reloaded, 1); rec["client_cert_subject"] != "CN=sensor-1" || rec["token_file"] != agentToken {
		t.Errorf("the agent's reload logged %v", rec)
	}
	// Then the gateway: the new certificate and both tokens.
	writeFile(t, dir, "gateway.pem", newCert)
	writeFile(t, dir, "gateway-key.pem", newKey)
	if err := gw.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if rec := waitCount(t, ctx, gw.log, reloaded, 1); rec["cert_subject"] != "CN=gateway" || rec["tokens"] != 2.0 || rec["cert_expires"] == nil {
		t.Errorf("the gateway's reload logged %v", rec)
	}

	// A new caller sees the new certificate: it connects trusting only the
	// new CA, and not trusting only the old one.
	newConn := caller(newCA.pemFile)
	if _, err := adminpb.NewAdminServiceClient(newConn).ListAgents(ctx, &adminpb.ListAgentsRequest{}); err != nil {
		t.Errorf("a caller trusting the new CA: %v", err)
	}
	distrusting := caller(oldCA.pemFile)
	_, err = adminpb.NewAdminServiceClient(distrusting).ListAgents(ctx, &adminpb.ListAgentsRequest{})
	distrusting.Close() // or it keeps trying
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a new caller trusting only the old CA: %v, want a certificate error", err)
	}

	// The old token goes; an agent that still presents it is refused, one
	// with the new token admitted.
	writeFile(t, dir, "tokens", []byte("new-token\n"))
	if err := gw.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if rec := waitCount(t, ctx, gw.log, reloaded, 2); rec["tokens"] != 1.0 {
		t.Errorf("the gateway's second reload logged %v", rec)
	}
	stale := startProcess(t, "stale agent", bin, agentArgs("sensor-2", writeFile(t, dir, "stale-token", []byte("old-token\n")))...)
	stale.log.waitMsg(t, ctx, "the gateway at "+addr+" does not admit this agent (check --token-file, the client certificate and --key); retrying, later failures are logged as warnings")
	fresh := startProcess(t, "fresh agent", bin, agentArgs("sensor-3", agentToken)...)
	waitAgent(t, ctx, newConn, "sensor-3", 1)

	// Bad files are refused as a whole, with the file and the reason, and
	// the certificate in use still serves new connections.
	_, otherKeyFile := newCA.clientCert(t, "other")
	otherKey := concat(t, otherKeyFile)
	for i, bad := range []struct {
		cert, key, tokens []byte
		why               string
	}{
		{[]byte("not PEM at all\n"), newKey, []byte("new-token\n"), gwCert},
		{newCert, otherKey, []byte("new-token\n"), "private key does not match public key"},
		{newCert, newKey, []byte("# no tokens\n"), gwTokens + ": no tokens"},
	} {
		writeFile(t, dir, "gateway.pem", bad.cert)
		writeFile(t, dir, "gateway-key.pem", bad.key)
		writeFile(t, dir, "tokens", bad.tokens)
		if err := gw.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		if rec := waitCount(t, ctx, gw.log, refused, i+1); !strings.Contains(rec["err"].(string), bad.why) || rec["level"] != "ERROR" {
			t.Errorf("refusal %d logged %v, want an error with %q", i+1, rec, bad.why)
		}
		if _, err := adminpb.NewAdminServiceClient(caller(newCA.pemFile)).ListAgents(ctx, &adminpb.ListAgentsRequest{}); err != nil {
			t.Errorf("after refusal %d, a new caller trusting the new CA: %v", i+1, err)
		}
	}
	// Refused with a token set that would have locked every agent out: the
	// new token still opens tunnels.
	waitAgent(t, ctx, newConn, "sensor-3", 1)

	// The call in progress kept going and ends OK, on the tunnel it
	// started on.
	echo(t, stream, "after the rotation")
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if err := stream.RecvMsg(new(wrapperspb.StringValue)); !errors.Is(err, io.EOF) {
		t.Errorf("the call in progress ended with %v, want OK", err)
	}
	after := waitAgent(t, ctx, newConn, "sensor-1", 1).GetTunnels()
	if len(after) != 1 || !after[0].GetOpenedAt().AsTime().Equal(before.GetOpenedAt().AsTime()) {
		t.Errorf("the agent's tunnels after the rotation %v, want the one opened at %v", after, before.GetOpenedAt().AsTime())
	}

	for _, p := range []*process{stale, fresh, ag, gw} {
		p.terminate(t)
	}
}
