package demo

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve starts a loopback server with Register's services and returns a
// connection to it; both are closed at cleanup.
func serve(t *testing.T, name string) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	Register(srv, NewDeviceService(name))
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-served
	})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func TestDeviceService(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := demopb.NewDeviceServiceClient(serve(t, "dev-7"))

	st, err := client.GetStatus(ctx, &demopb.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetServedBy() != "dev-7" || st.GetState() != "online" || st.GetCallsServed() != 1 {
		t.Errorf("GetStatus = %v, want served_by dev-7, state online, calls_served 1", st)
	}

	for _, tc := range []struct {
		lines int32
		want  []string
	}{
		{0, logLines},
		{-1, logLines},
		{2, logLines[len(logLines)-2:]},
		{int32(len(logLines) + 3), logLines},
	} {
		got, err := tail(ctx, client, tc.lines)
		if err != nil {
			t.Fatalf("Tail lines=%d: %v", tc.lines, err)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("Tail lines=%d = %q, want %q", tc.lines, got, tc.want)
		}
	}

	ack, err := client.Notify(ctx, &demopb.NotifyRequest{Text: "hello"})
	if err != nil {
		t.Fatal(err)
	}
	if ack.GetServedBy() != "dev-7" || !ack.GetAccepted() {
		t.Errorf("Notify = %v, want served_by dev-7, accepted", ack)
	}

	// Every call counts, streaming ones included: 1 + 4 Tails + 1 Notify.
	st, err = client.GetStatus(ctx, &demopb.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetCallsServed() != 7 {
		t.Errorf("calls_served = %d after 7 calls", st.GetCallsServed())
	}
}

func tail(ctx context.Context, client demopb.DeviceServiceClient, lines int32) ([]string, error) {
	stream, err := client.Tail(ctx, &demopb.TailRequest{Lines: lines})
	if err != nil {
		return nil, err
	}
	var got []string
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return got, nil
		}
		if err != nil {
			return got, err
		}
		got = append(got, msg.GetLine())
	}
}

// TestLogLinesIsACopy: callers compare against LogLines, so changing what
// it returns must not change what Tail sends.
func TestLogLinesIsACopy(t *testing.T) {
	l := LogLines()
	l[0] = "changed"
	if logLines[0] == "changed" {
		t.Fatal("LogLines returned the service's own slice")
	}
}

func TestHealthAndReflection(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := serve(t, "dev")

	for _, service := range []string{"", demopb.DeviceService_ServiceDesc.ServiceName} {
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatalf("health check of %q: %v", service, err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health of %q = %v, want SERVING", service, resp.GetStatus())
		}
	}

	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	for _, want := range []string{
		"grpctunnel.demo.v1.DeviceService",
		"grpc.health.v1.Health",
		"grpc.reflection.v1.ServerReflection",
	} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection lists %q, without %s", names, want)
		}
	}
}
