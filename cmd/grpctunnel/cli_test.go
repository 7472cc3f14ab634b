package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// runOnce runs the command line args (without the program name) to its end
// and returns its exit status and output.
func runOnce(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	out, errs := newLogBuffer(), newLogBuffer()
	code = run(testContext(t), args, out, errs)
	return code, out.String(), errs.String()
}

func TestTopLevelUsage(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"--help"}, {"help"}} {
		code, stdout, stderr := runOnce(t, args...)
		if code != 0 || stderr != "" {
			t.Errorf("%q: exit %d, stderr %q; want 0 and nothing", args, code, stderr)
		}
		for _, sub := range []string{"gateway", "agent", "demo"} {
			if !strings.Contains(stdout, "  "+sub+" ") {
				t.Errorf("%q does not list %s:\n%s", args, sub, stdout)
			}
		}
	}

	code, stdout, stderr := runOnce(t)
	if code != 2 || stdout != "" || !strings.HasPrefix(stderr, "grpctunnel: a command is required\n") {
		t.Errorf("no arguments: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	code, _, stderr = runOnce(t, "gatway", "--listen", ":0")
	if code != 2 || !strings.HasPrefix(stderr, "grpctunnel: unknown command \"gatway\"\n") || !strings.Contains(stderr, "Commands:") {
		t.Errorf("unknown command: exit %d, stderr %q", code, stderr)
	}
}

// TestSubcommandHelp: -h lists every flag, on stdout, and exits 0.
func TestSubcommandHelp(t *testing.T) {
	logFlags := []string{"--log-format text|json", "--log-level debug|info|warn|error"}
	for _, tc := range []struct {
		args  []string
		flags []string
	}{
		{[]string{"gateway", "-h"}, append([]string{
			"--listen addr", "--tls-cert file", "--tls-key file", "--client-ca file", "--token-file file",
			"--metrics addr", "--key-header header", "(default tunnel-key)", "--drain-timeout duration", "(default 30s)",
			"--keepalive-interval duration", "silent for duration (default 20s)",
			"--keepalive-timeout duration", "with the calls on it (default 10s)",
		}, logFlags...)},
		{[]string{"agent", "--help"}, append([]string{
			"--gateway addr", "--key key", "--target addr", "--tls\n", "--ca file", "--tls-cert file", "--tls-key file",
			"--server-name name", "--token-file file", "--insecure-token\n", "--target-tls\n", "--tunnels n", "(default 1)",
			"--key-header header", "--drain-timeout duration",
			"--keepalive-interval duration", "(every 10s at most) (default 20s)",
			"--keepalive-timeout duration", "the agent reconnects (default 10s)",
			"--max-backoff duration", "within 400ms (default 30s)",
		}, logFlags...)},
		{[]string{"demo", "-h"}, append([]string{"--keep\n", "(default error)"}, logFlags...)},
		{[]string{"help", "agent"}, []string{"Usage: grpctunnel agent --gateway ADDR --key KEY --target ADDR [flags]"}},
	} {
		code, stdout, stderr := runOnce(t, tc.args...)
		if code != 0 || stderr != "" {
			t.Errorf("%q: exit %d, stderr %q; want 0 and nothing", tc.args, code, stderr)
		}
		for _, want := range tc.flags {
			if !strings.Contains(stdout, want) {
				t.Errorf("%q: the help lacks %q:\n%s", tc.args, want, stdout)
			}
		}
	}
}

// TestBadCommandLines: each mistake exits 2 with one line that names it,
// then the usage, on stderr, before anything starts.
func TestBadCommandLines(t *testing.T) {
	dir := t.TempDir()
	token := writeFile(t, dir, "token", []byte("s3cret\n"))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"gateway"}, "grpctunnel gateway: --listen is required"},
		{[]string{"gateway", "--listen", ":0", "--tls-cert", "c.pem"}, "grpctunnel gateway: --tls-cert and --tls-key go together"},
		{[]string{"gateway", "--listen", ":0", "--tls-key", "k.pem"}, "grpctunnel gateway: --tls-cert and --tls-key go together"},
		{[]string{"gateway", "--listen", ":0", "--client-ca", "ca.pem"}, "grpctunnel gateway: --client-ca needs TLS"},
		{[]string{"gateway", "--listen", ":0", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--agent-key-from-cert"}, "grpctunnel gateway: --agent-key-from-cert needs client certificates"},
		{[]string{"gateway", "--listen", ":0", "--drain-timeout", "0s"}, "grpctunnel gateway: --drain-timeout must be positive"},
		{[]string{"gateway", "--listen", ":0", "--peer-listen", ":0"}, "grpctunnel gateway: --peer-listen makes sense only in a cluster: give --etcd too"},
		{[]string{"gateway", "--listen", ":0", "--etcd", "http://e:2379", "--cluster-token-file", "t"}, "grpctunnel gateway: --etcd needs --peer-listen"},
		{[]string{"gateway", "--listen", ":0", "--etcd", "http://e:2379", "--peer-listen", ":0"}, "grpctunnel gateway: --etcd needs --cluster-token-file"},
		{[]string{"gateway", "--listen", ":0", "--etcd", "e:2379", "--peer-listen", ":0", "--cluster-token-file", "t"}, `grpctunnel gateway: --etcd "e:2379" is not an etcd client URL`},
		{[]string{"gateway", "--listen", ":0", "--etcd", "http://e:2379", "--peer-listen", ":0", "--cluster-token-file", "t", "--cluster", "a/b"}, "grpctunnel gateway: --cluster must be a name without '/'"},
		{[]string{"gateway", "--listen", ":0", "--etcd", "http://e:2379", "--peer-listen", ":0", "--cluster-token-file", "t", "--lease-ttl", "100ms"}, "grpctunnel gateway: --lease-ttl must be at least 1s"},
		{[]string{"gateway", "--listen", ":0", "--etcd", "http://e:2379", "--peer-listen", ":0", "--cluster-token-file", "t", "--tls-cert", "c", "--tls-key", "k"}, "grpctunnel gateway: a cluster of TLS gateways needs --peer-ca"},
		{[]string{"gateway", "--listen", ":0", "--drain-timeout", "soon"}, "grpctunnel gateway: invalid value \"soon\" for flag -drain-timeout"},
		{[]string{"gateway", "--listen", ":0", "--keepalive-interval", "0s"}, "grpctunnel gateway: --keepalive-interval must be positive"},
		{[]string{"gateway", "--listen", ":0", "--keepalive-timeout", "-1s"}, "grpctunnel gateway: --keepalive-timeout must be positive"},
		{[]string{"gateway", "--listen", ":0", "--keepalive-timeout", "10"}, "grpctunnel gateway: invalid value \"10\" for flag -keepalive-timeout"},
		{[]string{"gateway", "--listen", ":0", "--log-format", "xml"}, "grpctunnel gateway: invalid value \"xml\" for flag -log-format: want text or json"},
		{[]string{"gateway", "--listen", ":0", "--log-level", "loud"}, "grpctunnel gateway: invalid value \"loud\" for flag -log-level: want debug, info, warn or error"},
		{[]string{"gateway", "--listen", ":0", "extra"}, "grpctunnel gateway: unexpected argument \"extra\""},
		{[]string{"gateway", "--lisen", ":0"}, "grpctunnel gateway: flag provided but not defined: -lisen"},
		{[]string{"agent", "--key", "k", "--target", "t:1"}, "grpctunnel agent: --gateway is required"},
		{[]string{"agent", "--gateway", "g:1", "--target", "t:1"}, "grpctunnel agent: --key is required"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k"}, "grpctunnel agent: --target is required"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--tls-cert", "c.pem"}, "grpctunnel agent: --tls-cert and --tls-key go together"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--server-name", "gw"}, "grpctunnel agent: --server-name needs TLS"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--token-file", token}, "grpctunnel agent: --token-file needs TLS (--tls or --ca): a token sent in plaintext can be read"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--tunnels", "0"}, "grpctunnel agent: --tunnels must be at least 1"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--max-backoff", "0s"}, "grpctunnel agent: --max-backoff must be positive"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--keepalive-interval", "-20s"}, "grpctunnel agent: --keepalive-interval must be positive"},
		{[]string{"agent", "--gateway", "g:1", "--key", "k", "--target", "t:1", "--keepalive-timeout", "0s"}, "grpctunnel agent: --keepalive-timeout must be positive"},
		{[]string{"demo", "--kep"}, "grpctunnel demo: flag provided but not defined: -kep"},
	} {
		code, stdout, stderr := runOnce(t, tc.args...)
		first, rest, _ := strings.Cut(stderr, "\n")
		if code != 2 || stdout != "" || !strings.HasPrefix(first, tc.want) || !strings.Contains(rest, "Usage: grpctunnel "+tc.args[0]) {
			t.Errorf("%q: exit %d, stdout %q, stderr:\n%s\nwant exit 2, a first line starting %q, then the usage", tc.args, code, stdout, stderr, tc.want)
		}
	}
}

// TestRuntimeFailures exit 1 with the reason in the log: the command line
// was fine, the world was not.
func TestRuntimeFailures(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.pem")
	occupied := startInProcess(t, runGateway, "--listen", "127.0.0.1:0", "--log-format", "json")
	addr := occupied.stderr.waitMsg(t, testContext(t), "listening")["addr"].(string)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"gateway", "--listen", "127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing}, "loading the TLS certificate"},
		{[]string{"gateway", "--listen", "127.0.0.1:0", "--token-file", missing}, "reading the token file"},
		{[]string{"gateway", "--listen", addr}, "address already in use"},
		{[]string{"agent", "--gateway", "127.0.0.1:1", "--key", "k", "--target", "127.0.0.1:1", "--ca", missing}, "reading CA certificates"},
	} {
		code, stdout, stderr := runOnce(t, tc.args...)
		if code != 1 || stdout != "" || !strings.Contains(stderr, "level=ERROR") || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stdout %q, stderr:\n%s\nwant exit 1 and an error with %q", tc.args, code, stdout, stderr, tc.want)
		}
	}
	if code := occupied.stop(t); code != 0 {
		t.Errorf("the first gateway exited %d", code)
	}
}

// TestStopBeforeAnything: a signal that comes while the gateway starts
// stops it as soon as it is up, cleanly.
func TestStopBeforeAnything(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	errs := newLogBuffer()
	if code := runGateway(ctx, []string{"--listen", "127.0.0.1:0"}, newLogBuffer(), errs); code != 0 {
		t.Errorf("gateway exit %d; log:\n%s", code, errs.String())
	}
}
