package window

import (
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/internal/testkit"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestSizes(t *testing.T) {
	for _, tc := range []struct {
		size         int
		stream, conn int32
		fixed        bool
	}{
		{size: 0, stream: Default, conn: 2 * Default, fixed: true},
		{size: -1},
		{size: 1 << 20, stream: 1 << 20, conn: 2 << 20, fixed: true},
		{size: 1, stream: minWindow, conn: 2 * minWindow, fixed: true},
		{size: 1 << 40, stream: 1<<30 - 1, conn: 1<<31 - 2, fixed: true},
	} {
		stream, conn, fixed := sizes(tc.size)
		if stream != tc.stream || conn != tc.conn || fixed != tc.fixed {
			t.Errorf("sizes(%d) = %d, %d, %v; want %d, %d, %v", tc.size, stream, conn, fixed, tc.stream, tc.conn, tc.fixed)
		}
	}
}

// TestFixedWindowsSendNoProbes makes sequential calls between a server
// and a client configured alike and counts the PING frames each sends: with
// gRPC's dynamic windows every call costs one or more, with fixed ones
// none, which is the point of the package.
func TestFixedWindowsSendNoProbes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size      int
		wantPings bool
	}{
		{"fixed", 0, false},
		{"dynamic", -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clientPings, serverPings := pingsDuringCalls(t, tc.size, 20)
			if got := clientPings+serverPings > 0; got != tc.wantPings {
				t.Fatalf("PINGs during 20 calls: client %d, server %d; want some: %v", clientPings, serverPings, tc.wantPings)
			}
		})
	}
}

// pingsDuringCalls serves health with windows of size, makes calls
// sequential Check calls, and returns how many PING frames (acknowledgements
// left out) the client and the server sent.
func pingsDuringCalls(t *testing.T, size, calls int) (clientPings, serverPings int) {
	srv := grpc.NewServer(ServerOptions(size)...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	addr := loopback.ServeAddr(t, srv)

	var pings testkit.PingCounter
	opts := append(DialOptions(size), grpc.WithContextDialer(pings.Dial), grpc.WithTransportCredentials(insecure.NewCredentials()))
	conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	for range calls {
		if _, err := client.Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	return pings.Sent(), pings.Received()
}
