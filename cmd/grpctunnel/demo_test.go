package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
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

// waitKeepCommands waits until demo --keep has printed its grpcurl
// commands, and returns its output so far; the commands come last, so once
// the admin call is printed all are. It returns ok false, with the output
// and the exit status, if the demo exits first.
func waitKeepCommands(t *testing.T, ctx context.Context, p *inProcess) (out string, code int, ok bool) {
	t.Helper()
	for {
		lines, changed := p.stdout.snapshot()
		out = strings.Join(lines, "\n")
		if strings.Contains(out, "AdminService/ListAgents") {
			return out, 0, true
		}
		select {
		case <-changed:
		case code := <-p.code:
			p.code <- code // for stop
			return p.stdout.String(), code, false
		case <-ctx.Done():
			t.Fatalf("no grpcurl commands before %v; output:\n%s\nlog:\n%s", ctx.Err(), out, p.stderr.String())
		}
	}
}

// TestDemoKeep: with --keep the demo prints grpcurl commands for the
// gateway it runs, which serves them until the demo is stopped. It takes
// free ports, not --keep's fixed ones, so that a demo left running on this
// machine cannot fail it.
func TestDemoKeep(t *testing.T) {
	ctx := testContext(t)
	p := startInProcess(t, runDemo, "--keep", "--listen", "127.0.0.1:0", "--service-listen", "127.0.0.1:0")
	out, code, ok := waitKeepCommands(t, ctx, p)
	if !ok {
		t.Fatalf("demo --keep exited %d before printing its commands; output:\n%s\nlog:\n%s", code, out, p.stderr.String())
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

// TestDemoKeepFixedPorts: demo --keep serves on the same ports every run,
// so that the commands it prints stay the same. The test is skipped, not
// failed, when something else on this machine already holds the ports,
// such as a demo --keep a developer has left running.
func TestDemoKeepFixedPorts(t *testing.T) {
	ctx := testContext(t)
	p := startInProcess(t, runDemo, "--keep")
	out, code, ok := waitKeepCommands(t, ctx, p)
	if !ok {
		if code == 1 && strings.Contains(p.stderr.String(), "address already in use") {
			t.Skipf("the fixed ports are taken on this machine:\n%s", p.stderr.String())
		}
		t.Fatalf("demo --keep exited %d before printing its commands; output:\n%s\nlog:\n%s", code, out, p.stderr.String())
	}
	for _, want := range []string{
		"device service listening on " + demoKeepServiceListen + " ",
		"gateway listening on " + demoKeepListen + " ",
		"grpcurl -plaintext -H 'tunnel-key: demo' " + demoKeepListen + " list\n",
		"grpcurl -plaintext " + demoKeepListen + " grpctunnel.admin.v1.AdminService/ListAgents",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the output lacks %q:\n%s", want, out)
		}
	}
	if code := p.stop(t); code != 0 {
		t.Errorf("demo --keep exited %d after the signal; log:\n%s", code, p.stderr.String())
	}
}

// TestDemoKeepPaste runs each grpcurl command demo --keep prints through a
// shell, exactly as printed, as a newcomer pasting them would, with the
// real grpcurl.
func TestDemoKeepPaste(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the commands are quoted for a POSIX shell")
	}
	grpcurl := findGrpcurl(t)
	ctx := testContext(t)
	p := startInProcess(t, runDemo, "--keep", "--listen", "127.0.0.1:0", "--service-listen", "127.0.0.1:0")
	out, code, ok := waitKeepCommands(t, ctx, p)
	if !ok {
		t.Fatalf("demo --keep exited %d before printing its commands; output:\n%s\nlog:\n%s", code, out, p.stderr.String())
	}
	// What each command's output must contain, in the order printed.
	wants := []string{
		"grpctunnel.demo.v1.DeviceService\n",
		`"servedBy": "demo-device"`,
		`"line": "sensor: temperature 21.6C"`,
		`"key": "demo"`,
	}
	var ran int
	for line := range strings.Lines(out) {
		cmdline, found := strings.CutPrefix(strings.TrimSpace(line), "grpcurl ")
		if !found {
			continue
		}
		if ran == len(wants) {
			t.Fatalf("more commands than the %d expected:\n%s", len(wants), out)
		}
		sh := exec.CommandContext(ctx, "sh", "-c", `"$GRPCURL" `+cmdline)
		sh.Env = append(os.Environ(), "GRPCURL="+grpcurl)
		got, err := sh.CombinedOutput()
		if err != nil || !strings.Contains(string(got), wants[ran]) {
			t.Errorf("pasting %q: %v, output:\n%s\nwant it to contain %q", strings.TrimSpace(line), err, got, wants[ran])
		}
		ran++
	}
	if ran != len(wants) {
		t.Errorf("ran %d commands, want %d; output:\n%s", ran, len(wants), out)
	}
	if code := p.stop(t); code != 0 {
		t.Errorf("demo --keep exited %d after the signal; log:\n%s", code, p.stderr.String())
	}
}

// TestDemoPortTaken: an address already in use fails the demo at once,
// naming the part, the address and the flag that picks another.
func TestDemoPortTaken(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	addr := taken.Addr().String()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"demo", "--keep", "--listen", addr, "--service-listen", "127.0.0.1:0"},
			"grpctunnel demo: gateway: listen tcp " + addr + ": bind: address already in use (stop what holds the address, or give another with --listen)\n"},
		{[]string{"demo", "--service-listen", addr},
			"grpctunnel demo: device service: listen tcp " + addr + ": bind: address already in use (stop what holds the address, or give another with --service-listen)\n"},
	} {
		code, _, stderr := runOnce(t, tc.args...)
		if code != 1 || stderr != tc.want {
			t.Errorf("%q: exit %d, stderr %q; want 1 and %q", tc.args, code, stderr, tc.want)
		}
	}
}

// TestDemoAddresses: --keep's fixed addresses, and free ports without it,
// apply only where no flag gives an address.
func TestDemoAddresses(t *testing.T) {
	for _, tc := range []struct {
		in, want demoConfig
	}{
		{demoConfig{keep: true}, demoConfig{keep: true, listen: "127.0.0.1:50051", serviceListen: "127.0.0.1:50052"}},
		{demoConfig{}, demoConfig{listen: "127.0.0.1:0", serviceListen: "127.0.0.1:0"}},
		{demoConfig{keep: true, listen: ":6000"}, demoConfig{keep: true, listen: ":6000", serviceListen: "127.0.0.1:50052"}},
		{demoConfig{serviceListen: "127.0.0.1:7000"}, demoConfig{listen: "127.0.0.1:0", serviceListen: "127.0.0.1:7000"}},
	} {
		got := tc.in
		got.resolve()
		if got != tc.want {
			t.Errorf("%+v resolved to %+v, want %+v", tc.in, got, tc.want)
		}
	}
	for _, tc := range []struct {
		addr *net.TCPAddr
		want string
	}{
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50051}, "127.0.0.1:50051"},
		{&net.TCPAddr{IP: net.IPv4zero, Port: 50051}, "127.0.0.1:50051"},
		{&net.TCPAddr{IP: net.IPv6unspecified, Port: 50051}, "127.0.0.1:50051"},
		{&net.TCPAddr{IP: net.IPv6loopback, Port: 50051}, "[::1]:50051"},
	} {
		if got := dialAddr(tc.addr); got != tc.want {
			t.Errorf("dialAddr(%v) = %q, want %q", tc.addr, got, tc.want)
		}
	}
}
