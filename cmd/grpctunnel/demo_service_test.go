package main

import (
	"context"
	"encoding/json"
	"net"
	"runtime"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/grpctunnel/grpctunnel/internal/demo"
	"github.com/grpctunnel/grpctunnel/internal/demopb"
)

// TestDemoService runs demo-service on a port it picks, as a newcomer's
// agent would find it, and calls the device, health and reflection on the
// address it logs; then stops it as the first signal would.
func TestDemoService(t *testing.T) {
	ctx := testContext(t)
	p := startInProcess(t, runDemoService, "--listen", "127.0.0.1:0", "--log-format", "json", "--name", "bench-7")
	rec := p.stderr.waitMsg(t, ctx, "listening")
	addr, _ := rec["addr"].(string)
	if host, port, err := net.SplitHostPort(addr); err != nil || host != "127.0.0.1" || port == "0" {
		t.Fatalf("listening on %q, want 127.0.0.1 and the port picked", addr)
	}
	conn := dial(t, addr, insecure.NewCredentials())

	st, err := demopb.NewDeviceServiceClient(conn).GetStatus(ctx, &demopb.GetStatusRequest{})
	if err != nil || st.GetServedBy() != "bench-7" || st.GetState() != "online" {
		t.Errorf("GetStatus = %v, %v; want served_by bench-7 (--name), state online", st, err)
	}
	health := healthpb.NewHealthClient(conn)
	for _, svc := range []string{"", "grpctunnel.demo.v1.DeviceService"} {
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health of %q = %v, %v; want SERVING", svc, resp, err)
		}
	}
	services, err := listServices(ctx, conn)
	if err != nil {
		t.Fatalf("reflection: %v", err)
	}
	for _, want := range []string{"grpctunnel.demo.v1.DeviceService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
		if !slices.Contains(services, want) {
			t.Errorf("reflection lists %q, without %s", services, want)
		}
	}

	// A health Watch lasts until its caller ends it: the stop must first
	// tell it NOT_SERVING, then wait for it rather than cut it off.
	watchCtx, cancelWatch := context.WithCancel(ctx)
	defer cancelWatch()
	watch, err := health.Watch(watchCtx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch: %v, %v; want SERVING", resp, err)
	}
	p.cancel()
	if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch after the signal: %v, %v; want NOT_SERVING", resp, err)
	}
	p.stderr.waitMsg(t, ctx, "stopping: draining calls")
	cancelWatch()
	if code := p.stop(t); code != 0 {
		t.Errorf("demo-service exited %d after the signal; log:\n%s", code, p.stderr.String())
	}
	p.stderr.waitMsg(t, ctx, "stopped")
	if strings.Contains(p.stderr.String(), "drain cut short") {
		t.Errorf("the drain was cut short though the Watch ended; log:\n%s", p.stderr.String())
	}
}

// TestDemoServiceBadStart: a missing --listen is a bad command line, and a
// port already taken fails at once, naming the address.
func TestDemoServiceBadStart(t *testing.T) {
	code, stdout, stderr := runOnce(t, "demo-service")
	if code != 2 || stdout != "" || !strings.HasPrefix(stderr, "grpctunnel demo-service: --listen is required\n") ||
		!strings.Contains(stderr, "Usage: grpctunnel demo-service --listen ADDR [flags]") {
		t.Errorf("no --listen: exit %d, stdout %q, stderr:\n%s", code, stdout, stderr)
	}
	code, _, stderr = runOnce(t, "demo-service", "--listen", "127.0.0.1:0", "--drain-timeout", "0s")
	if code != 2 || !strings.HasPrefix(stderr, "grpctunnel demo-service: --drain-timeout must be positive\n") {
		t.Errorf("--drain-timeout 0s: exit %d, stderr:\n%s", code, stderr)
	}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	code, stdout, stderr = runOnce(t, "demo-service", "--listen", taken.Addr().String())
	if code != 1 || stdout != "" || !strings.Contains(stderr, "demo service failed to start") ||
		!strings.Contains(stderr, taken.Addr().String()) || !strings.Contains(stderr, "address already in use") {
		t.Errorf("a port already taken: exit %d, stdout %q, stderr:\n%s", code, stdout, stderr)
	}
}

// TestDemoServiceQuickStart runs the README's quick start as processes: a
// demo-service, a gateway and an agent forwarding to it, and grpcurl as
// the caller, through the gateway and straight to the service; then
// SIGTERM stops each cleanly.
func TestDemoServiceQuickStart(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops the processes with SIGTERM")
	}
	grpcurl := findGrpcurl(t)
	bin := buildCommand(t)
	ctx := testContext(t)

	svc := startProcess(t, "demo-service", bin, "demo-service", "--listen", "127.0.0.1:0", "--log-format", "json")
	svcAddr, _ := svc.log.waitMsg(t, ctx, "listening")["addr"].(string)
	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json")
	gwAddr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	ag := startProcess(t, "agent", bin, "agent", "--gateway", gwAddr, "--key", demoKey, "--target", svcAddr, "--log-format", "json")
	waitAgent(t, ctx, dial(t, gwAddr, insecure.NewCredentials()), demoKey, 1)

	grpcurlOK := func(args ...string) string {
		t.Helper()
		out, err := runGrpcurl(ctx, grpcurl, args...)
		if err != nil {
			t.Fatalf("grpcurl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	for _, target := range []struct {
		name  string
		flags []string
		addr  string
	}{
		{"through the gateway", []string{"-plaintext", "-H", "tunnel-key: " + demoKey}, gwAddr},
		{"straight to the service", []string{"-plaintext"}, svcAddr},
	} {
		// call runs grpcurl on method (or "list"): grpcurl wants its
		// flags first, then the address, then the method.
		call := func(method string, flags ...string) string {
			t.Helper()
			return grpcurlOK(slices.Concat(target.flags, flags, []string{target.addr, method})...)
		}
		list := lines(call("list"))
		for _, want := range []string{"grpctunnel.demo.v1.DeviceService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
			if !slices.Contains(list, want) {
				t.Errorf("list %s = %q, without %s", target.name, list, want)
			}
		}
		var st struct{ ServedBy, State string }
		decodeAll(t, call("grpctunnel.demo.v1.DeviceService/GetStatus"),
			func(d *json.Decoder) error { return d.Decode(&st) })
		if st.ServedBy != demoServiceName || st.State != "online" {
			t.Errorf("GetStatus %s = %+v, want servedBy %s, state online", target.name, st, demoServiceName)
		}
		var tail []string
		decodeAll(t, call("grpctunnel.demo.v1.DeviceService/Tail", "-d", `{"lines": 2}`),
			func(d *json.Decoder) error {
				var msg struct{ Line string }
				err := d.Decode(&msg)
				if err == nil {
					tail = append(tail, msg.Line)
				}
				return err
			})
		if all := demo.LogLines(); !slices.Equal(tail, all[len(all)-2:]) {
			t.Errorf("Tail lines=2 %s = %q, want %q", target.name, tail, all[len(all)-2:])
		}
		var health struct{ Status string }
		decodeAll(t, call("grpc.health.v1.Health/Check"),
			func(d *json.Decoder) error { return d.Decode(&health) })
		if health.Status != "SERVING" {
			t.Errorf("health %s = %+v, want SERVING", target.name, health)
		}
	}

	ag.terminate(t)
	gw.terminate(t)
	svc.terminate(t)
	svc.log.waitMsg(t, ctx, "stopped")
}
