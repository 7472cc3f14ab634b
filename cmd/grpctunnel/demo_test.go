package main

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
)

// TestDemo runs the demo and checks its account of each step, in order.
func TestDemo(t *testing.T) {
	start := time.Now()
	code, stdout, stderr := runOnce(t, "demo")
	if code != 0 || stderr != "" {
		t.Fatalf("demo: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	// The demo is meant to be run by hand: it must not keep anyone
	// waiting.
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the demo took %v", d)
	}
	rest := stdout
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`device service listening on 127\.0\.0\.1:\d+ `),
		regexp.MustCompile(`gateway listening on 127\.0\.0\.1:\d+ `),
		regexp.MustCompile(`agent "demo" opened a tunnel to the gateway`),
		regexp.MustCompile(`reflection through the gateway with tunnel-key: demo lists: .*grpctunnel\.demo\.v1\.DeviceService`),
		regexp.MustCompile(`GetStatus \(unary\): served_by=demo-device state=online calls_served=1\n`),
		regexp.MustCompile(`Tail lines=3 \(server streaming\):\n  sensor: temperature 21.5C\n  sensor: temperature 21.7C\n  sensor: temperature 21.6C\n`),
		regexp.MustCompile(`AdminService.ListAgents \(no tunnel-key header, so the gateway answers itself\): "demo" with 1 tunnel\(s\)\n`),
		regexp.MustCompile(`GetStatus with tunnel-key: nobody: Unavailable: grpctunnel gateway: no agent is connected with tunnel-key "nobody"\n`),
		regexp.MustCompile(`stopped the agent, the gateway and the device service\n$`),
	} {
		loc := want.FindStringIndex(rest)
		if loc == nil {
			t.Fatalf("the output lacks %q after the lines before it; whole output:\n%s", want, stdout)
		}
		rest = rest[loc[1]:]
	}
}

// TestDemoKeep: with --keep the demo prints grpcurl commands for the
// gateway it runs, which serves them until the demo is stopped.
func TestDemoKeep(t *testing.T) {
	ctx := testContext(t)
	p := startInProcess(t, runDemo, "--keep")
	// The commands come last, so once the admin call is printed all are.
	var out string
	for {
		lines, changed := p.stdout.snapshot()
		out = strings.Join(lines, "\n")
		if strings.Contains(out, "AdminService/ListAgents") {
			break
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("no grpcurl commands before %v; output:\n%s\nlog:\n%s", ctx.Err(), out, p.stderr.String())
		}
	}
	m := regexp.MustCompile(`grpcurl -plaintext -H 'tunnel-key: demo' (127\.0\.0\.1:\d+) list\n`).FindStringSubmatch(out + "\n")
	if m == nil {
		t.Fatalf("no list command in:\n%s", out)
	}
	addr := m[1]
	for _, want := range []string{
		"grpcurl -plaintext -H 'tunnel-key: demo' " + addr + " grpctunnel.demo.v1.DeviceService/GetStatus",
		"grpcurl -plaintext -H 'tunnel-key: demo' -d '{\"lines\": 3}' " + addr + " grpctunnel.demo.v1.DeviceService/Tail",
		"grpcurl -plaintext " + addr + " grpctunnel.admin.v1.AdminService/ListAgents",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the output lacks %q:\n%s", want, out)
		}
	}

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := demopb.NewDeviceServiceClient(conn).GetStatus(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "demo"), &demopb.GetStatusRequest{})
	if err != nil || st.GetServedBy() != "demo-device" {
		t.Fatalf("GetStatus through the printed address: %v, %v", st, err)
	}
	conn.Close()

	if code := p.stop(t); code != 0 {
		t.Errorf("demo --keep exited %d after the signal; log:\n%s", code, p.stderr.String())
	}
}
