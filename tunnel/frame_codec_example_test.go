package tunnel_test

import (
	"context"
	"fmt"
	"log"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// A server that accepts tunnels encodes their frames without reflection;
// its other services keep the proto codec.
func ExampleCodec() {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	server := grpc.NewServer(grpc.ForceServerCodecV2(tunnel.Codec()))
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
	healthpb.RegisterHealthServer(handler, health.NewServer())
	tunnelpb.RegisterTunnelServiceServer(server, handler.Service())
	healthpb.RegisterHealthServer(server, health.NewServer()) // an ordinary service
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = server.Serve(lis)
	}()
	defer func() {
		server.Stop()
		<-done
	}()

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx := context.Background()

	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("directly:", resp.GetStatus())

	ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer ch.Close()
	resp, err = healthpb.NewHealthClient(ch).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("through the tunnel:", resp.GetStatus())
	// Output:
	// directly: SERVING
	// through the tunnel: SERVING
}
