package main

import (
	"encoding/json"
	"runtime"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/credentials/insecure"
)

// TestFanOutWithGrpcurl: grpcurl, knowing nothing of grpctunnel, calls a
// unary method of two agents at once through the gateway, and of one
// agent present and one missing: reflection describes the fan-out view
// (a stream of the response with the label), so grpcurl prints one
// labelled result per agent, the missing one's with its status.
func TestFanOutWithGrpcurl(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("the test stops the processes with SIGTERM")
	}
	grpcurl := findGrpcurl(t)
	bin := buildCommand(t)
	ctx := testContext(t)
	gw := startProcess(t, "gateway", bin, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json")
	addr, _ := gw.log.waitMsg(t, ctx, "listening")["addr"].(string)
	for _, key := range []string{"site-a", "site-b"} {
		startProcess(t, "agent "+key, bin, "agent", "--gateway", addr, "--key", key, "--target", startTarget(t, key+"-device"), "--log-format", "json")
	}
	conn := dial(t, addr, insecure.NewCredentials())
	waitAgent(t, ctx, conn, "site-a", 1)
	waitAgent(t, ctx, conn, "site-b", 1)

	grpcurlOK := func(args ...string) string {
		t.Helper()
		out, err := runGrpcurl(ctx, grpcurl, args...)
		if err != nil {
			t.Fatalf("grpcurl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	type result struct {
		ServedBy string
		Label    struct {
			Backend string
			Status  struct {
				Code    int
				Message string
			}
		} `json:"grpctunnelLabel"`
	}
	call := func(keys string) map[string]result {
		t.Helper()
		got := make(map[string]result)
		decodeAll(t, grpcurlOK("-plaintext", "-H", "tunnel-key: "+keys, addr, "grpctunnel.demo.v1.DeviceService/GetStatus"), func(d *json.Decoder) error {
			var r result
			if err := d.Decode(&r); err != nil {
				return err
			}
			got[r.Label.Backend] = r
			return nil
		})
		return got
	}

	if list := lines(grpcurlOK("-plaintext", "-H", "tunnel-key: site-a,site-b", addr, "list")); !slices.Contains(list, "grpctunnel.demo.v1.DeviceService") {
		t.Errorf("list through two agents: %q", list)
	}
	describe := grpcurlOK("-plaintext", "-H", "tunnel-key: site-a,site-b", addr, "describe", "grpctunnel.demo.v1.DeviceService.GetStatus")
	if !strings.Contains(describe, "returns ( stream .grpctunnel.demo.v1.GetStatusResponse )") {
		t.Errorf("GetStatus as two agents show it:\n%s", describe)
	}

	got := call("site-a,site-b")
	if len(got) != 2 || got["site-a"].ServedBy != "site-a-device" || got["site-b"].ServedBy != "site-b-device" {
		t.Errorf("GetStatus of site-a and site-b: %+v", got)
	}
	got = call("site-a,gone")
	if len(got) != 2 || got["site-a"].ServedBy != "site-a-device" || got["gone"].Label.Status.Code != 14 || !strings.Contains(got["gone"].Label.Status.Message, `"gone"`) {
		t.Errorf("GetStatus of site-a and an agent that is not connected: %+v", got)
	}

	// Health is the gateway's, not fanned out.
	health := grpcurlOK("-plaintext", "-H", "tunnel-key: site-a,site-b", addr, "grpc.health.v1.Health/Check")
	if strings.Count(health, "SERVING") != 1 {
		t.Errorf("health with two agents named:\n%s", health)
	}
}
