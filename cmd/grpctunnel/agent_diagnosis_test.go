package main

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

// TestAgentSaysWhyTheGatewayRefusesIt: TLS mistakes on either side read
// as what they are, not as an unreachable gateway, in the first error the
// agent logs.
func TestAgentSaysWhyTheGatewayRefusesIt(t *testing.T) {
	ca := newTestCA(t, "deploy")
	other := newTestCA(t, "other")
	srvCert, srvKey := ca.serverCert(t)
	strangerCert, strangerKey := other.clientCert(t, "k")
	tlsGateway := []string{"--tls-cert", srvCert, "--tls-key", srvKey}
	mtlsGateway := append(tlsGateway[:len(tlsGateway):len(tlsGateway)], "--client-ca", ca.pemFile)
	for _, tc := range []struct {
		name    string
		gateway []string
		agent   []string
		want    string
	}{
		{"agent plaintext, gateway TLS", tlsGateway, nil, "may expect TLS"},
		{"agent TLS, gateway plaintext", nil, []string{"--ca", ca.pemFile}, "does not speak TLS"},
		{"gateway certificate not trusted", tlsGateway, []string{"--ca", other.pemFile}, "does not trust the certificate of the gateway"},
		{"no client certificate", mtlsGateway, []string{"--ca", ca.pemFile}, "rejected the agent's certificate"},
		{"client certificate of another CA", mtlsGateway, []string{"--ca", ca.pemFile, "--tls-cert", strangerCert, "--tls-key", strangerKey}, "rejected the agent's certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gw, addr := startGatewayCmd(t, tc.gateway...)
			ag := startAgentCmd(t, append([]string{"--gateway", addr, "--key", "k", "--target", "127.0.0.1:1"}, tc.agent...)...)
			// The first error may have to do with less (TLS 1.3 sends a
			// refused client certificate's alert after the handshake, so a
			// first write can meet a closed connection first); an error that
			// says what happened must follow before the test's deadline.
			ag.stderr.waitRecord(t, testContext(t), "an error saying "+tc.want, func(r map[string]any) bool {
				msg, _ := r["msg"].(string)
				return r["level"] == "ERROR" && strings.Contains(msg, tc.want)
			})
			for _, r := range func() []map[string]any { recs, _ := ag.stderr.records(); return recs }() {
				if msg, _ := r["msg"].(string); r["level"] == "ERROR" && strings.HasPrefix(msg, "cannot reach") {
					t.Errorf("the agent logged %q (err %q) although the gateway answered", msg, r["err"])
				}
			}
			stopAll(t, ag, gw)
		})
	}
}

// TestAgentRefusesWhatCannotWork: a key the gateway would refuse on every
// tunnel, and an address without a port (gRPC would quietly try 443), fail
// on the command line.
func TestAgentRefusesWhatCannotWork(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--gateway", "g:1", "--key", "a,b", "--target", "t:1"}, `grpctunnel agent: --key "a,b" contains a comma: the gateway accepts no such key`},
		{[]string{"--gateway", "g:1", "--key", " a", "--target", "t:1"}, `grpctunnel agent: --key " a" has surrounding spaces`},
		{[]string{"--gateway", "gw.example.com", "--key", "k", "--target", "t:1"}, `grpctunnel agent: --gateway "gw.example.com" has no port: give host:port`},
		{[]string{"--gateway", "g:1", "--key", "k", "--target", "localhost"}, `grpctunnel agent: --target "localhost" has no port`},
	} {
		code, stdout, stderr := runOnce(t, append([]string{"agent"}, tc.args...)...)
		if code != 2 || stdout != "" || !strings.HasPrefix(stderr, tc.want) {
			t.Errorf("%q: exit %d, stdout %q, stderr:\n%s\nwant exit 2 and a first line starting %q", tc.args, code, stdout, stderr, tc.want)
		}
	}
	for _, ok := range []string{"dns:///gw.example.com:443", "unix:///run/gw.sock", "[::1]:50051"} {
		if missingPort(ok) {
			t.Errorf("missingPort(%q) = true, want false", ok)
		}
	}
}

// TestAgentHealthAndMetrics: with --metrics the agent serves /healthz,
// 200 while its tunnel is open, 503 saying why once the gateway is gone,
// and its metrics at /metrics.
func TestAgentHealthAndMetrics(t *testing.T) {
	ctx := testContext(t)
	gw, addr := startGatewayCmd(t)
	ag := startAgentCmd(t, "--gateway", addr, "--key", "k", "--target", "127.0.0.1:1", "--metrics", "127.0.0.1:0")
	metricsAddr, _ := ag.stderr.waitMsg(t, ctx, "metrics listening")["addr"].(string)
	ag.stderr.waitMsg(t, ctx, "tunnel open")
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := get("/healthz"); code != http.StatusOK || !strings.HasPrefix(body, "ok: 1 tunnels open") {
		t.Errorf("/healthz with the tunnel open: %d %q", code, body)
	}
	if _, body := get("/metrics"); !strings.Contains(body, `grpctunnel_agent_tunnels_open{key="k"} 1`) {
		t.Errorf("/metrics lacks the open tunnel:\n%s", body)
	}
	stopAll(t, gw)
	testkit.WaitFor(t, func() bool { code, _ := get("/healthz"); return code == http.StatusServiceUnavailable })
	if _, body := get("/healthz"); body != "no tunnel open to the gateway\n" {
		t.Errorf("/healthz without the gateway says %q", body)
	}
	ag.stop(t)
}
