package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
)

// certsFiles are the files `certs --agents site-a,site-b --callers
// operator` writes, with their modes.
var certsFiles = map[string]os.FileMode{
	"ca.crt":                0o644,
	"ca.key":                0o600,
	"gateway.crt":           0o644,
	"gateway.key":           0o600,
	"agent-site-a.crt":      0o644,
	"agent-site-a.key":      0o600,
	"agent-site-a.token":    0o600,
	"agent-site-b.crt":      0o644,
	"agent-site-b.key":      0o600,
	"agent-site-b.token":    0o600,
	"agent-tokens.txt":      0o600,
	"caller-operator.crt":   0o644,
	"caller-operator.key":   0o600,
	"caller-operator.token": 0o600,
	"caller-tokens.txt":     0o600,
}

// runCertsCmd runs `grpctunnel certs` into dir, which it may make, for
// agents site-a and site-b and caller operator, and args more; it fails the
// test unless the command succeeds.
func runCertsCmd(t *testing.T, dir string, args ...string) (stdout string) {
	t.Helper()
	code, stdout, stderr := runOnce(t, append([]string{"certs", "--dir", dir, "--agents", "site-a,site-b", "--callers", "operator"}, args...)...)
	if code != 0 || stderr != "" {
		t.Fatalf("certs: exit %d, stderr:\n%s", code, stderr)
	}
	return stdout
}

// checkCertsFiles checks that dir holds exactly certsFiles, with their
// modes, and that dir itself is its owner's only. Windows has no such
// modes, only a read-only flag.
func checkCertsFiles(t *testing.T, dir string) {
	t.Helper()
	modes := runtime.GOOS != "windows"
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); modes && mode != 0o700 {
		t.Errorf("the directory's mode is %#o, want 0700", mode)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		want, ok := certsFiles[e.Name()]
		switch {
		case !ok:
			t.Errorf("unexpected file %s", e.Name())
		case !fi.Mode().IsRegular() || modes && fi.Mode().Perm() != want:
			t.Errorf("%s has mode %v, want a regular file of %#o", e.Name(), fi.Mode(), want)
		}
	}
	if len(names) != len(certsFiles) {
		t.Errorf("the directory holds %q, want the %d files of certsFiles", names, len(certsFiles))
	}
}

// TestCertsFiles: the command writes every file with its mode, makes the directory its owner's only, and prints the commands that
// use the files by their real names.
func TestCertsFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new", "certs")
	stdout := runCertsCmd(t, dir)
	checkCertsFiles(t, dir)
	for _, want := range []string{
		"Wrote 15 files to " + dir,
		"grpctunnel gateway --listen localhost:8443",
		"--tls-cert " + filepath.Join(dir, "gateway.crt") + " --tls-key " + filepath.Join(dir, "gateway.key"),
		"--client-ca " + filepath.Join(dir, "ca.crt") + " --agent-key-from-cert",
		"--token-file " + filepath.Join(dir, "agent-tokens.txt") + " --caller-token-file " + filepath.Join(dir, "caller-tokens.txt"),
		"grpctunnel agent --gateway localhost:8443 --key site-b",
		"--tls-cert " + filepath.Join(dir, "agent-site-b.crt") + " --tls-key " + filepath.Join(dir, "agent-site-b.key"),
		"--token-file " + filepath.Join(dir, "agent-site-b.token"),
		"-cert " + filepath.Join(dir, "caller-operator.crt") + " -key " + filepath.Join(dir, "caller-operator.key"),
		`-H "tunnel-authorization: Bearer $(cat ` + filepath.Join(dir, "caller-operator.token") + `)"`,
		"-H 'tunnel-key: site-a' localhost:8443 list",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("the summary lacks %q:\n%s", want, stdout)
		}
	}
}

// TestCertsChain: every certificate chains to ca.crt for its use, the
// gateway's names the hosts given and no other, each key file goes with
// its certificate, and the keys are ECDSA P-256.
func TestCertsChain(t *testing.T) {
	dir := t.TempDir()
	runCertsCmd(t, dir, "--hosts", "localhost,gw.example.net,127.0.0.1,::1", "--days", "30")
	roots, err := loadCAs(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	ca := readCert(t, dir, "ca")
	if !ca.IsCA || ca.MaxPathLen != 0 || !ca.MaxPathLenZero {
		t.Errorf("ca.crt: IsCA %t, MaxPathLen %d; want a CA that signs leaves only", ca.IsCA, ca.MaxPathLen)
	}
	if got := time.Until(ca.NotAfter); got < 3649*24*time.Hour || got > 3650*24*time.Hour {
		t.Errorf("the CA is valid for %v more, want the default 3650 days", got)
	}

	gw := readCert(t, dir, "gateway")
	for _, name := range []string{"localhost", "gw.example.net", "127.0.0.1", "::1"} {
		if _, err := gw.Verify(x509.VerifyOptions{Roots: roots, DNSName: name}); err != nil {
			t.Errorf("gateway.crt for %s: %v", name, err)
		}
	}
	if _, err := gw.Verify(x509.VerifyOptions{Roots: roots, DNSName: "other.example.net"}); err == nil {
		t.Error("gateway.crt verifies for other.example.net")
	}
	// The replicas of a cluster present it to each other's peer ports.
	if _, err := gw.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("gateway.crt as a replica's client certificate: %v", err)
	}
	if got := time.Until(gw.NotAfter); got < 29*24*time.Hour || got > 30*24*time.Hour {
		t.Errorf("gateway.crt is valid for %v more, want --days 30", got)
	}

	for _, base := range []string{"agent-site-a", "agent-site-b", "caller-operator"} {
		cert := readCert(t, dir, base)
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Errorf("%s.crt as a client certificate: %v", base, err)
		}
		// Nor can it pass for a replica on a peer port.
		if isServerCert(cert) {
			t.Errorf("%s.crt is good for server authentication, so it could pass for a replica", base)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots}); err == nil {
			t.Errorf("%s.crt verifies as a server certificate", base)
		}
	}

	for _, base := range []string{"ca", "gateway", "agent-site-a", "agent-site-b", "caller-operator"} {
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key"))
		if err != nil {
			t.Errorf("%s.crt and %s.key: %v", base, base, err)
			continue
		}
		if key, ok := pair.PrivateKey.(*ecdsa.PrivateKey); !ok || key.Curve != elliptic.P256() {
			t.Errorf("%s.key is a %T, want an ECDSA P-256 key", base, pair.PrivateKey)
		}
	}
	// What the gateway and the agent load them with.
	if _, err := serverTLS(filepath.Join(dir, "gateway.crt"), filepath.Join(dir, "gateway.key"), filepath.Join(dir, "ca.crt")); err != nil {
		t.Errorf("serverTLS: %v", err)
	}
	if _, err := clientTLS(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "agent-site-a.crt"), filepath.Join(dir, "agent-site-a.key"), ""); err != nil {
		t.Errorf("clientTLS: %v", err)
	}
}

// TestCertsAgentIdentity: the gateway's --agent-key-from-cert admits an
// agent's certificate for its own key, and neither it for another key nor
// a caller's certificate for any agent's.
func TestCertsAgentIdentity(t *testing.T) {
	dir := t.TempDir()
	runCertsCmd(t, dir)
	roots, err := loadCAs(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	// The context of an opening RPC over mutual TLS, as gRPC gives it to
	// the gateway after the handshake verified base's certificate.
	verified := func(base string) context.Context {
		chains, err := readCert(t, dir, base).Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		if err != nil {
			t.Fatalf("%s.crt: %v", base, err)
		}
		info := credentials.TLSInfo{State: tls.ConnectionState{VerifiedChains: chains}}
		return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: info})
	}
	for _, tc := range []struct {
		cert, key string
		want      codes.Code
	}{
		{"agent-site-a", "site-a", codes.OK},
		{"agent-site-b", "site-b", codes.OK},
		{"agent-site-a", "site-b", codes.PermissionDenied},
		{"agent-site-b", "site-a", codes.PermissionDenied},
		{"caller-operator", "site-a", codes.PermissionDenied},
	} {
		if err := gateway.CertificateNamesKey(verified(tc.cert), tc.key); status.Code(err) != tc.want {
			t.Errorf("%s.crt for key %s: %v, want %v", tc.cert, tc.key, err, tc.want)
		}
	}
}

// TestCertsTokens: the gateway's token files parse, each agent's token is
// bound to its key, the files for agents and callers hold their token
// alone, and every token is 32 random bytes of its own.
func TestCertsTokens(t *testing.T) {
	dir := t.TempDir()
	runCertsCmd(t, dir)
	agents, err := loadTokens(filepath.Join(dir, "agent-tokens.txt"))
	if err != nil {
		t.Fatal(err)
	}
	callers, err := loadTokens(filepath.Join(dir, "caller-tokens.txt"))
	if err != nil {
		t.Fatal(err)
	}
	token := func(base string) string {
		data, err := os.ReadFile(filepath.Join(dir, base+".token"))
		if err != nil {
			t.Fatal(err)
		}
		tok, err := readAgentToken(filepath.Join(dir, base+".token"))
		if err != nil {
			t.Fatal(err)
		}
		// The token alone, so that $(cat file) is it.
		if string(data) != tok+"\n" {
			t.Errorf("%s.token holds %q, want the token and a newline", base, data)
		}
		if raw, err := base64.RawURLEncoding.DecodeString(tok); err != nil || len(raw) != 32 {
			t.Errorf("%s.token: %q is not 32 bytes in base64url: %v", base, tok, err)
		}
		return tok
	}
	siteA, siteB, operator := token("agent-site-a"), token("agent-site-b"), token("caller-operator")
	if siteA == siteB || siteA == operator || siteB == operator {
		t.Fatalf("tokens repeat: %q, %q, %q", siteA, siteB, operator)
	}

	withHeader := func(header, tok string) context.Context {
		return metadata.NewIncomingContext(context.Background(), metadata.Pairs(header, "Bearer "+tok))
	}
	for _, tc := range []struct {
		tok, key string
		want     codes.Code
	}{
		{siteA, "site-a", codes.OK},
		{siteB, "site-b", codes.OK},
		{siteA, "site-b", codes.PermissionDenied},
		{siteB, "site-a", codes.PermissionDenied},
		{operator, "site-a", codes.Unauthenticated},
	} {
		if err := agents.authorize(withHeader("authorization", tc.tok), tc.key); status.Code(err) != tc.want {
			t.Errorf("an agent's tunnel for %s with token %.6s...: %v, want %v", tc.key, tc.tok, err, tc.want)
		}
	}
	// The caller's token reaches every agent and the admin service; an
	// agent's is no caller's.
	for _, keys := range [][]string{{"site-a"}, {"site-b"}, nil} {
		if err := callers.authorizeCall(withHeader(callerTokenHeader, operator), "/grpctunnel.admin.v1.AdminService/ListAgents", keys); err != nil {
			t.Errorf("the caller's token for %q: %v", keys, err)
		}
	}
	if err := callers.authorizeCall(withHeader(callerTokenHeader, siteA), "/m", []string{"site-a"}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("an agent's token as a caller's: %v, want Unauthenticated", err)
	}
}

// TestCertsNoOverwrite: without --force the command writes nothing when
// any of its files exists; with it, it replaces them all, with their modes,
// and leaves no temporary file behind.
func TestCertsNoOverwrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	runCertsCmd(t, dir)
	before := readAll(t, dir)
	args := []string{"certs", "--dir", dir, "--agents", "site-a,site-b", "--callers", "operator"}
	code, stdout, stderr := runOnce(t, args...)
	if code != 1 || stdout != "" || !strings.HasPrefix(stderr, "grpctunnel certs: "+dir+" already holds ca.crt, ca.key, gateway.crt and 12 more") ||
		!strings.Contains(stderr, "wrote nothing (--force replaces them)") {
		t.Errorf("a second run: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if after := readAll(t, dir); !equalFiles(before, after) {
		t.Error("a refused run changed the files")
	}

	// One file in the way is enough, and the others are not written.
	other := t.TempDir()
	if err := os.Chmod(other, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, other, "caller-tokens.txt", []byte("mine\n"))
	code, _, stderr = runOnce(t, "certs", "--dir", other, "--agents", "site-a", "--callers", "operator")
	if code != 1 || !strings.Contains(stderr, other+" already holds caller-tokens.txt; wrote nothing") {
		t.Errorf("a run into a directory with caller-tokens.txt: exit %d, stderr %q", code, stderr)
	}
	if entries, _ := os.ReadDir(other); len(entries) != 1 {
		t.Errorf("a refused run left %d files, want the 1 that was there", len(entries))
	}
	// An existing directory keeps its mode, and the summary says so.
	if err := os.Remove(filepath.Join(other, "caller-tokens.txt")); err != nil {
		t.Fatal(err)
	}
	stdout = runCertsCmd(t, other)
	fi, err := os.Stat(other)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 && runtime.GOOS != "windows" {
		t.Errorf("the existing directory's mode is %v; want it left at 0755", fi.Mode())
	}
	if runtime.GOOS != "windows" && !strings.Contains(stdout, "The directory was there already, with mode 0755") {
		t.Errorf("the summary does not mention the open directory:\n%s", stdout)
	}

	// --force replaces them, and sets the modes of files that had others.
	if err := os.Chmod(filepath.Join(dir, "ca.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	runCertsCmd(t, dir, "--force")
	checkCertsFiles(t, dir)
	after := readAll(t, dir)
	for name, data := range before {
		if bytes.Equal(after[name], data) {
			t.Errorf("--force left %s as it was", name)
		}
	}
}

// TestCertsBadCommandLines: each mistake exits 2 with one line naming it
// and the usage, and writes nothing.
func TestCertsBadCommandLines(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--agents", "a", "--callers", "c"}, "--dir is required"},
		{[]string{"--dir", "D", "--callers", "c"}, "--agents is required"},
		{[]string{"--dir", "D", "--agents", "a"}, "--callers is required"},
		{[]string{"--dir", "D", "--agents", ",", "--callers", "c"}, "--agents names no agent key"},
		{[]string{"--dir", "D", "--agents", "a", "--callers", "c", "--hosts", ""}, "--hosts names no host"},
		{[]string{"--dir", "D", "--agents", "../a", "--callers", "c"}, `--agents: "../a" starts with '.'`},
		{[]string{"--dir", "D", "--agents", "a b", "--callers", "c"}, `--agents: "a b" has ' '`},
		{[]string{"--dir", "D", "--agents", "a", "--callers", "x/y"}, `--callers: "x/y" has '/'`},
		{[]string{"--dir", "D", "--agents", strings.Repeat("k", 65), "--callers", "c"}, "longer than 64 bytes"},
		{[]string{"--dir", "D", "--agents", "a,b,a", "--callers", "c"}, `--agents: "a" twice`},
		{[]string{"--dir", "D", "--agents", "a,b", "--callers", "b"}, `"b" is both an agent key and a caller name`},
		{[]string{"--dir", "D", "--agents", "a", "--callers", "c", "--hosts", "localhost:8443"}, `--hosts: "localhost:8443" has a port`},
		{[]string{"--dir", "D", "--agents", "a", "--callers", "c", "--hosts", "gw_1.example"}, `"gw_1.example" is neither an IP address nor a DNS name`},
		{[]string{"--dir", "D", "--agents", "a", "--callers", "c", "--days", "0"}, "--days must be positive"},
		{[]string{"--dir", "D", "--agents", "a", "--callers", "c", "--days", "900", "--ca-days", "825"}, "--ca-days must be at least --days"},
	} {
		dir := t.TempDir()
		args := slices.Clone(tc.args)
		if i := slices.Index(args, "D"); i >= 0 {
			args[i] = filepath.Join(dir, "certs")
		}
		code, stdout, stderr := runOnce(t, append([]string{"certs"}, args...)...)
		first, _, _ := strings.Cut(stderr, "\n")
		if code != 2 || stdout != "" || !strings.HasPrefix(first, "grpctunnel certs: ") || !strings.Contains(first, tc.want) ||
			!strings.Contains(stderr, "Usage: grpctunnel certs --dir DIR") {
			t.Errorf("%q: exit %d, stderr:\n%s\nwant 2 and %q", tc.args, code, stderr, tc.want)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("%q wrote into the directory", tc.args)
		}
	}
}

// readCert parses base.crt in dir.
func readCert(t *testing.T, dir, base string) *x509.Certificate {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return pair.Leaf
}

// readAll reads every file in dir.
func readAll(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, e := range entries {
		if files[e.Name()], err = os.ReadFile(filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	return files
}

func equalFiles(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for name, data := range a {
		if !bytes.Equal(b[name], data) {
			return false
		}
	}
	return true
}
