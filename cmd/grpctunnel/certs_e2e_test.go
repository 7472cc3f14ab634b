package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestCertsEndToEnd is the secure quick start as an operator runs it:
// `grpctunnel certs`, then the gateway with mutual TLS, key-bound agent
// tokens, --agent-key-from-cert and caller tokens, an agent beside a
// service, and grpcurl calling through them, all with the files certs
// wrote and nothing else. Then the refusals: a caller without its token or
// its certificate, and an agent announcing a key its certificate does not
// name.
func TestCertsEndToEnd(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test runs certs under sh and stops the processes with SIGTERM")
	}
	grpcurl := findGrpcurl(t)
	bin := buildCommand(t)
	ctx := testContext(t)
	dir := filepath.Join(t.TempDir(), "certs")
	file := func(name string) string { return filepath.Join(dir, name) }

	// Under a umask that makes new files private, which the certificates
	// must not be: agents and callers are given them to read.
	out, err := exec.CommandContext(ctx, "/bin/sh", "-c", `umask 077 && exec "$0" "$@"`,
		bin, "certs", "--dir", dir, "--agents", "site-a,site-b", "--callers", "operator").CombinedOutput()
	if err != nil {
		t.Fatalf("grpctunnel certs: %v\n%s", err, out)
	}
	checkCertsFiles(t, dir)

	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json",
		"--tls-cert", file("gateway.crt"), "--tls-key", file("gateway.key"), "--client-ca", file("ca.crt"),
		"--agent-key-from-cert", "--token-file", file("agent-tokens.txt"), "--caller-token-file", file("caller-tokens.txt"))
	addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	target := startTarget(t, "site-a-device")
	// agentArgs runs an agent for key with the certificate and the token
	// certs wrote for the agents certOf and tokenOf.
	agentArgs := func(key, certOf, tokenOf string) []string {
		return []string{"agent", "--gateway", addr, "--key", key, "--target", target, "--log-format", "json",
			"--ca", file("ca.crt"), "--tls-cert", file("agent-" + certOf + ".crt"), "--tls-key", file("agent-" + certOf + ".key"),
			"--token-file", file("agent-" + tokenOf + ".token")}
	}
	ag := startProcess(t, "agent", bin, agentArgs("site-a", "site-a", "site-a")...)
	opened := gw.log.waitRecord(t, ctx, "of site-a's tunnel opening", func(r map[string]any) bool {
		return r["msg"] == "agent tunnel opened" && r["key"] == "site-a"
	})
	if id := opened["identity"]; id != "CN=site-a,OU=agent,O=grpctunnel" {
		t.Errorf("the gateway took the agent for %v, want CN=site-a,OU=agent,O=grpctunnel", id)
	}

	token, err := os.ReadFile(file("caller-operator.token"))
	if err != nil {
		t.Fatal(err)
	}
	certArgs := []string{"-cacert", file("ca.crt"), "-cert", file("caller-operator.crt"), "-key", file("caller-operator.key")}
	tokenArgs := []string{"-H", callerTokenHeader + ": Bearer " + strings.TrimSpace(string(token))}
	grpcurlArgs := func(parts ...[]string) []string {
		var args []string
		for _, p := range parts {
			args = append(args, p...)
		}
		return args
	}
	toSiteA := []string{"-H", "tunnel-key: site-a", addr, "grpctunnel.demo.v1.DeviceService/GetStatus"}

	resp, err := runGrpcurl(ctx, grpcurl, grpcurlArgs(certArgs, tokenArgs, toSiteA)...)
	if err != nil {
		t.Fatalf("grpcurl GetStatus through site-a: %v\n%s", err, resp)
	}
	var st struct{ ServedBy string }
	if err := json.Unmarshal([]byte(resp), &st); err != nil || st.ServedBy != "site-a-device" {
		t.Errorf("GetStatus through site-a = %s (%v), want servedBy site-a-device", resp, err)
	}
	resp, err = runGrpcurl(ctx, grpcurl, grpcurlArgs(certArgs, tokenArgs, []string{addr, "grpctunnel.admin.v1.AdminService/ListAgents"})...)
	if err != nil || !strings.Contains(resp, `"key": "site-a"`) || !strings.Contains(resp, `"identity": "CN=site-a,OU=agent,O=grpctunnel"`) {
		t.Errorf("ListAgents: %v\n%s", err, resp)
	}

	// A caller with its certificate but without its token.
	resp, err = runGrpcurl(ctx, grpcurl, grpcurlArgs(certArgs, toSiteA)...)
	if err == nil || !strings.Contains(resp, "Unauthenticated") || !strings.Contains(resp, "a caller must present a token") {
		t.Errorf("GetStatus without the caller's token: %v\n%s", err, resp)
	}
	// A caller with its token but without its certificate gets no
	// connection.
	resp, err = runGrpcurl(ctx, grpcurl, grpcurlArgs([]string{"-cacert", file("ca.crt")}, tokenArgs, toSiteA)...)
	if err == nil || !strings.Contains(resp, "certificate required") {
		t.Errorf("GetStatus without a client certificate: %v\n%s", err, resp)
	}

	// Agent site-b's token, but site-a's certificate: the token admits
	// site-b, the certificate does not.
	impostor := startProcess(t, "impostor agent", bin, agentArgs("site-b", "site-a", "site-b")...)
	refused := impostor.log.waitRecord(t, ctx, "at level ERROR", func(r map[string]any) bool { return r["level"] == "ERROR" })
	if msg, _ := refused["msg"].(string); !strings.Contains(msg, "the gateway at "+addr+" does not admit this agent") {
		t.Errorf("the impostor logged %v", refused)
	}
	if e, _ := refused["err"].(string); !strings.Contains(e, "PermissionDenied") || !strings.Contains(e, "does not name key") {
		t.Errorf("the impostor was refused with %v, want the certificate's refusal", refused["err"])
	}

	impostor.terminate(t)
	ag.terminate(t)
	gw.terminate(t)
}
