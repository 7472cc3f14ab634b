package gateway_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
)

// This example runs a gateway, a service behind an agent, and a client
// that reaches the service through the gateway by naming the agent's key.
func Example() {
	quiet := slog.New(slog.DiscardHandler)

	// The gateway: one port for agents and callers alike.
	g, err := gateway.New(gateway.Options{Logger: quiet})
	if err != nil {
		panic(err)
	}
	gwServer := grpc.NewServer(g.ServerOptions()...)
	g.Register(gwServer)
	gwLis, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() { _ = gwServer.Serve(gwLis) }()
	defer gwServer.Stop()

	// The service behind NAT: here, gRPC health that says "SERVING" for a
	// service the gateway does not know.
	svc := grpc.NewServer()
	h := health.NewServer()
	h.SetServingStatus("printer", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(svc, h)
	svcLis, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() { _ = svc.Serve(svcLis) }()
	defer svc.Stop()

	// The agent, next to the service: it dials out to the gateway.
	insecureCreds := grpc.WithTransportCredentials(insecure.NewCredentials())
	toGateway, _ := grpc.NewClient(gwLis.Addr().String(), insecureCreds)
	defer toGateway.Close()
	toService, _ := grpc.NewClient(svcLis.Addr().String(), insecureCreds)
	defer toService.Close()
	a, err := agent.New(toGateway, toService, agent.Options{Key: "office-printer", Logger: quiet})
	if err != nil {
		panic(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- a.Run(context.Background()) }()
	defer func() {
		a.Stop()
		<-ran
	}()
	if err := g.Agent("office-printer").WaitForReady(context.Background()); err != nil {
		panic(err)
	}

	// Any gRPC client: it names the agent in the tunnel-key header.
	client, _ := grpc.NewClient(gwLis.Addr().String(), insecureCreds)
	defer client.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "tunnel-key", "office-printer")
	resp, err := healthpb.NewHealthClient(client).Check(ctx, &healthpb.HealthCheckRequest{Service: "printer"})
	if err != nil {
		panic(err)
	}
	fmt.Println("printer:", resp.GetStatus())
	// Output:
	// printer: SERVING
}
