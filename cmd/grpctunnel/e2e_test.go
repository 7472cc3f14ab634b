package main

// The end-to-end test runs the built command as an operator would: the
// gateway and the agent as separate processes, and a real grpcurl, which
// knows nothing of tunnels, as the caller.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/internal/demo"
)

// findGrpcurl returns the grpcurl to run: $GRPCURL, or the one on PATH.
// Without one the end-to-end test is skipped, unless
// GRPCTUNNEL_REQUIRE_E2E=1 (as in CI) makes that a failure, so that CI
// cannot pass without running it.
func findGrpcurl(t *testing.T) string {
	t.Helper()
	required := os.Getenv("GRPCTUNNEL_REQUIRE_E2E") == "1"
	missing := func(why string) {
		if required {
			t.Fatalf("GRPCTUNNEL_REQUIRE_E2E=1 but %s", why)
		}
		t.Skipf("skipping the end-to-end test: %s (install github.com/fullstorydev/grpcurl/cmd/grpcurl or set GRPCURL)", why)
	}
	if path := os.Getenv("GRPCURL"); path != "" {
		if _, err := os.Stat(path); err != nil {
			missing(fmt.Sprintf("GRPCURL=%s: %v", path, err))
		}
		return path
	}
	path, err := exec.LookPath("grpcurl")
	if err != nil {
		missing("grpcurl is not on PATH and GRPCURL is not set")
	}
	return path
}

// buildCommand builds this package's command into a temporary directory.
// It builds with the race detector when the tests run with it, which both
// reuses the packages the test build compiled and checks the processes for
// races too.
func buildCommand(t *testing.T) string {
	t.Helper()
	//lint:ignore SA1019 the test binary was built by the toolchain that runs it, so its GOROOT is that toolchain's
	goTool := filepath.Join(runtime.GOROOT(), "bin", "go")
	bin := filepath.Join(t.TempDir(), "grpctunnel")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	// A cold build cache compiles gRPC and its dependencies: slow, but not
	// unbounded.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, goTool, append(args, ".")...).CombinedOutput()
	if err != nil {
		t.Fatalf("go %s .: %v\n%s", strings.Join(args, " "), err, out)
	}
	return bin
}

// process is the command running as a child process.
type process struct {
	name string
	cmd  *exec.Cmd
	log  *logBuffer // stdout and stderr
	done chan struct{}
	err  error // Wait's, once done is closed
}

// startProcess starts bin with args. At the end of the test it is killed
// if still running, and its output goes to the test log if the test
// failed.
func startProcess(t *testing.T, name, bin string, args ...string) *process {
	t.Helper()
	p := &process{name: name, cmd: exec.Command(bin, args...), log: newLogBuffer(), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	// A race-enabled binary otherwise waits a second before it exits.
	p.cmd.Env = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s (%s) output:\n%s", name, strings.Join(args, " "), p.log.String())
		}
	})
	return p
}

// terminate sends SIGTERM and checks that the process drains and exits 0
// in good time.
func (p *process) terminate(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("signalling the %s: %v", p.name, err)
	}
	select {
	case <-p.done:
	case <-time.After(waitTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		t.Fatalf("the %s did not exit within %v of SIGTERM", p.name, waitTimeout)
	}
	if p.err != nil {
		t.Errorf("the %s exited with %v after SIGTERM, want status 0", p.name, p.err)
	}
	if strings.Contains(p.log.String(), "DATA RACE") {
		t.Errorf("the %s reported a data race", p.name)
	}
}

func TestEndToEnd(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops the processes with SIGTERM")
	}
	grpcurl := findGrpcurl(t)
	start := time.Now()
	bin := buildCommand(t)
	t.Logf("built the command in %v", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	ctx := testContext(t)

	target := startTarget(t, "e2e-device")
	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--log-format", "json", "--compress")
	addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	metricsAddr, _ := gw.log.waitMsg(t, ctx, "metrics listening")["addr"].(string)
	ag := startProcess(t, "agent", bin, "agent", "--gateway", addr, "--key", "e2e", "--target", target, "--log-format", "json", "--tunnels", "2")
	// Two tunnels, so that the calls below go through the gateway's choice
	// between tunnels; waiting for both makes the tunnel gauge exact.
	conn := dial(t, addr, insecure.NewCredentials())
	waitAgent(t, ctx, conn, "e2e", 2)

	grpcurlOK := func(args ...string) string {
		t.Helper()
		out, err := runGrpcurl(ctx, grpcurl, args...)
		if err != nil {
			t.Fatalf("grpcurl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	header := []string{"-plaintext", "-H", "tunnel-key: e2e"}

	// The agent's service, found by its own reflection through the tunnel.
	list := lines(grpcurlOK(append(header, addr, "list")...))
	for _, want := range []string{"grpctunnel.demo.v1.DeviceService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
		if !slices.Contains(list, want) {
			t.Errorf("list through the agent = %q, without %s", list, want)
		}
	}
	if slices.Contains(list, "grpctunnel.admin.v1.AdminService") {
		t.Errorf("list through the agent = %q: the gateway's own admin service", list)
	}
	describe := grpcurlOK(append(header, addr, "describe", "grpctunnel.demo.v1.DeviceService")...)
	if !strings.Contains(describe, "rpc Tail ( .grpctunnel.demo.v1.TailRequest ) returns ( stream .grpctunnel.demo.v1.TailResponse );") {
		t.Errorf("describe DeviceService:\n%s", describe)
	}

	// A unary call.
	var st struct{ ServedBy, State, CallsServed string }
	decodeAll(t, grpcurlOK(append(header, addr, "grpctunnel.demo.v1.DeviceService/GetStatus")...), func(d *json.Decoder) error { return d.Decode(&st) })
	if st.ServedBy != "e2e-device" || st.State != "online" || st.CallsServed != "1" {
		t.Errorf("GetStatus = %+v, want servedBy e2e-device, state online, callsServed 1", st)
	}

	// A server-streaming call: several messages back through the tunnel.
	var tail []string
	decodeAll(t, grpcurlOK(append(header, "-d", `{"lines": 3}`, addr, "grpctunnel.demo.v1.DeviceService/Tail")...), func(d *json.Decoder) error {
		var msg struct{ Line string }
		err := d.Decode(&msg)
		if err == nil {
			tail = append(tail, msg.Line)
		}
		return err
	})
	if all := demo.LogLines(); !slices.Equal(tail, all[len(all)-3:]) {
		t.Errorf("Tail lines=3 = %q, want %q", tail, all[len(all)-3:])
	}

	// Without the header the gateway answers itself.
	own := lines(grpcurlOK("-plaintext", addr, "list"))
	if !slices.Contains(own, "grpctunnel.admin.v1.AdminService") || slices.Contains(own, "grpctunnel.demo.v1.DeviceService") {
		t.Errorf("list without the header = %q, want the gateway's services, with grpctunnel.admin.v1.AdminService", own)
	}
	var agents struct {
		Agents []struct {
			Key     string
			Tunnels []struct{ Peer string }
		}
	}
	decodeAll(t, grpcurlOK("-plaintext", addr, "grpctunnel.admin.v1.AdminService/ListAgents"), func(d *json.Decoder) error { return d.Decode(&agents) })
	if len(agents.Agents) != 1 || agents.Agents[0].Key != "e2e" || len(agents.Agents[0].Tunnels) != 2 {
		t.Errorf("ListAgents = %+v, want agent e2e with 2 tunnels", agents)
	}

	// A key no agent holds: reflection goes to e2e so that grpcurl knows
	// the method, and the call itself fails at the gateway, saying why.
	out, err := runGrpcurl(ctx, grpcurl, "-plaintext", "-reflect-header", "tunnel-key: e2e", "-rpc-header", "tunnel-key: nobody",
		addr, "grpctunnel.demo.v1.DeviceService/GetStatus")
	if err == nil || !strings.Contains(out, "Code: Unavailable") || !strings.Contains(out, `no agent is connected with tunnel-key "nobody"`) {
		t.Errorf("GetStatus for a missing agent: %v\n%s", err, out)
	}

	// The calls show in the metrics, labelled by agent key; an unknown key
	// gets no label of its own. A call is counted when the gateway has
	// finished with it, which may be just after grpcurl has its answer, so
	// this polls until the calls are all in.
	metrics := waitMetrics(t, ctx, "http://"+metricsAddr+"/metrics", func(body string) bool {
		return metricValue(body, `grpctunnel_gateway_rpcs_total{code="OK",key="e2e"}`) >= 7 &&
			metricValue(body, `grpctunnel_gateway_rpcs_total{code="Unavailable",key="_other"}`) >= 1
	})
	for _, want := range []string{
		`grpctunnel_gateway_agent_tunnels{key="e2e"} 2`,
		"process_start_time_seconds ",
		"go_goroutines ",
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("the metrics lack %q", want)
		}
	}
	if strings.Contains(metrics, `"nobody"`) {
		t.Error("the metrics have a label for a key no agent holds")
	}

	// The gateway drains and exits 0; the agent, left without it, says so
	// as an error, keeps trying, and exits 0 when told to stop.
	gw.terminate(t)
	gw.log.waitMsg(t, ctx, "stopped")
	ag.log.waitRecord(t, ctx, "saying the gateway cannot be reached", func(r map[string]any) bool {
		msg, _ := r["msg"].(string)
		return r["level"] == "ERROR" && strings.HasPrefix(msg, "cannot reach the gateway at "+addr)
	})
	ag.terminate(t)
	ag.log.waitMsg(t, ctx, "stopped")
	t.Logf("ran the processes and grpcurl in %v", time.Since(start).Round(time.Millisecond))
}

// runGrpcurl runs grpcurl with args and returns its output, stdout and
// stderr together as a user sees them.
func runGrpcurl(ctx context.Context, grpcurl string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, grpcurl, append([]string{"-max-time", "10"}, args...)...).CombinedOutput()
	return string(out), err
}

// lines splits output into its non-empty lines.
func lines(out string) []string {
	var ls []string
	for l := range strings.Lines(out) {
		if l = strings.TrimSpace(l); l != "" {
			ls = append(ls, l)
		}
	}
	return ls
}

// decodeAll decodes JSON values from out with decode until the end; grpcurl
// prints one value for each response message.
func decodeAll(t *testing.T, out string, decode func(*json.Decoder) error) {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(out))
	for {
		err := decode(d)
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("decoding grpcurl's output: %v\n%s", err, out)
		}
	}
}

// waitMetrics polls url until its body satisfies ok, and returns the body.
func waitMetrics(t *testing.T, ctx context.Context, url string, ok func(string) bool) string {
	t.Helper()
	// A transport of its own, closed at the end, leaves no idle
	// connection's goroutines behind for goleak to find.
	transport := &http.Transport{}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var body string
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		data, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s, %v", url, resp.Status, err)
		}
		if body = string(data); ok(body) {
			return body
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("the metrics did not show the calls before %v:\n%s", ctx.Err(), body)
		}
	}
}

// metricValue returns the value of the sample series in a Prometheus text
// exposition, or -1 if it is absent.
func metricValue(body, series string) float64 {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return -1
	}
	return v
}

// TestSecondSignal: a second SIGTERM cuts the drain short, however long
// --drain-timeout is, and the gateway still exits 0. It runs the built
// command because only main wires the signals.
func TestSecondSignal(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops the processes with SIGTERM")
	}
	bin := buildCommand(t)
	ctx := testContext(t)
	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json", "--drain-timeout", "1h")
	addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	ag := startProcess(t, "agent", bin, "agent", "--gateway", addr, "--key", "k", "--target", startTarget(t, "sensor"), "--log-format", "json")
	conn := dial(t, addr, insecure.NewCredentials())
	waitAgent(t, ctx, conn, "k", 1)

	// A health Watch lasts until the caller ends it, so the drain cannot
	// finish on its own.
	watchCtx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "tunnel-key", "k"))
	defer cancel()
	watch, err := healthpb.NewHealthClient(conn).Watch(watchCtx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch: %v, %v", resp, err)
	}

	if err := gw.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	gw.log.waitMsg(t, ctx, "stopping: draining agents' tunnels and calls")
	gw.terminate(t)
	gw.log.waitMsg(t, ctx, "drain cut short: closed the calls still in progress")
	if _, err := watch.Recv(); err == nil {
		t.Error("the Watch went on after the gateway stopped")
	}
	cancel()
	ag.terminate(t)
}
