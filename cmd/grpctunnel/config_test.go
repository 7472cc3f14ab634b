package main

import (
	"io"
	"path/filepath"
	"testing"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
)

// TestFlagSources: a flag is read from the command line, else from its
// GRPCTUNNEL_ variable, else from the --config file, else it keeps its
// default; and the file can name the config file's flags only.
func TestFlagSources(t *testing.T) {
	dir := t.TempDir()
	config := writeFile(t, dir, "agent.conf", []byte(`# every source sets some
key from-file
target file:1 # a comment after a value
tunnels 3
tls
`))
	t.Setenv("GRPCTUNNEL_KEY", "from-env")
	t.Setenv("GRPCTUNNEL_TARGET", "env:1")

	c := newCLI("agent", "", "", io.Discard, io.Discard)
	key := c.fs.String("key", "", "")
	target := c.fs.String("target", "", "")
	tunnels := c.fs.Int("tunnels", 1, "")
	tls := c.fs.Bool("tls", false, "")
	gateway := c.fs.String("gateway", "default:1", "")
	if code, ok := c.parse([]string{"--config", config, "--key", "from-flag"}); !ok {
		t.Fatalf("parse failed with status %d", code)
	}
	for _, got := range []struct{ name, got, want string }{
		{"key (flag, environment and file)", *key, "from-flag"},
		{"target (environment and file)", *target, "env:1"},
		{"gateway (default only)", *gateway, "default:1"},
	} {
		if got.got != got.want {
			t.Errorf("%s = %q, want %q", got.name, got.got, got.want)
		}
	}
	if *tunnels != 3 || !*tls {
		t.Errorf("from the file: tunnels %d, tls %v; want 3, true", *tunnels, *tls)
	}
}

// TestBadFlagSources: a bad value in the environment, an unknown flag in
// the config file and a config file that does not exist are command-line
// errors that name where the bad value came from.
func TestBadFlagSources(t *testing.T) {
	dir := t.TempDir()
	unknown := writeFile(t, dir, "bad.conf", []byte("lisen :0\n"))
	for _, tc := range []struct {
		env  string
		args []string
		want string
	}{
		{"abc", []string{"gateway", "--listen", ":0"}, `grpctunnel gateway: error parsing environment variables: error setting flag "max-msg-size" from environment variable "GRPCTUNNEL_MAX_MSG_SIZE"`},
		{"", []string{"gateway", "--config", unknown}, `grpctunnel gateway: config file flag "lisen" not defined in flag set`},
		{"", []string{"gateway", "--config", filepath.Join(dir, "missing.conf")}, "grpctunnel gateway: open "},
	} {
		t.Setenv("GRPCTUNNEL_MAX_MSG_SIZE", tc.env)
		code, stdout, stderr := runOnce(t, tc.args...)
		if code != 2 || stdout != "" || len(stderr) < len(tc.want) || stderr[:len(tc.want)] != tc.want {
			t.Errorf("%q with GRPCTUNNEL_MAX_MSG_SIZE=%q: exit %d, stderr:\n%s\nwant exit 2 and a first line starting %q", tc.args, tc.env, code, stderr, tc.want)
		}
	}
}

// TestAgentFromConfigFile: the agent command started from a config file
// and the environment alone, as an operator's unit file would, runs with
// those settings.
func TestAgentFromConfigFile(t *testing.T) {
	dir := t.TempDir()
	gw, addr := startGatewayCmd(t)
	config := writeFile(t, dir, "agent.conf", []byte("gateway "+addr+"\nkey from-file\n"))
	t.Setenv("GRPCTUNNEL_TARGET", "127.0.0.1:1")
	ag := startAgentCmd(t, "--config", config)
	started := ag.stderr.waitMsg(t, testContext(t), "agent starting")
	if started["gateway"] != addr || started["key"] != "from-file" || started["target"] != "127.0.0.1:1" {
		t.Errorf("the agent started with gateway %v, key %v, target %v; want %s, from-file, 127.0.0.1:1", started["gateway"], started["key"], started["target"], addr)
	}
	ag.stderr.waitMsg(t, testContext(t), "tunnel open")
	stopAll(t, ag, gw)
}

// TestDefaultConfigsAreTheFlagsDefaults: what the demo runs with is what
// the commands run with when no flag is given.
func TestDefaultConfigsAreTheFlagsDefaults(t *testing.T) {
	gw := defaultGatewayConfig()
	if gw.maxStreams != gateway.DefaultMaxStreamsPerConnection || gw.windowSize != gateway.DefaultWindowSize ||
		gw.maxMsgSize != defaultMaxMsgSize || gw.keyHeader != gateway.DefaultKeyHeader || gw.keepalive.interval != defaultKeepaliveInterval {
		t.Errorf("default gateway configuration: %+v", gw)
	}
	ag := defaultAgentConfig()
	if ag.tunnels != 1 || ag.windowSize != agent.DefaultWindowSize || ag.maxBackoff != defaultMaxBackoff || ag.keepalive.interval != defaultKeepaliveInterval {
		t.Errorf("default agent configuration: %+v", ag)
	}
}
