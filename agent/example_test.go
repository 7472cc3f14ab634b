package agent_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
)

// This example puts an unchanged gRPC service behind an agent, so that a
// client reaches it through a gateway by naming the agent's key. Everything
// runs on loopback here; in practice the agent and its service sit behind
// NAT and only the gateway is public.
func Example() {
	quiet := slog.New(slog.DiscardHandler)
	creds := grpc.WithTransportCredentials(insecure.NewCredentials())

	// The gateway, somewhere the agent can dial.
	gw, err := gateway.New(gateway.Options{Logger: quiet})
	if err != nil {
		panic(err)
	}
	gwServer := grpc.NewServer(gw.ServerOptions()...)
	gw.Register(gwServer)
	gwLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go func() { _ = gwServer.Serve(gwLis) }()

	// The service to expose: any gRPC server will do; here, gRPC health.
	svc := grpc.NewServer()
	h := health.NewServer()
	h.SetServingStatus("thermostat", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(svc, h)
	svcLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go func() { _ = svc.Serve(svcLis) }()

	// The agent needs one connection out to the gateway and one to the
	// service. It dials out, so nothing has to dial in behind the NAT.
	// DialOptions gives both the flow-control windows the gateway uses.
	toGateway, err := grpc.NewClient(gwLis.Addr().String(),
		append(agent.DialOptions(0), creds, grpc.WithIdleTimeout(agent.IdleTimeout))...)
	if err != nil {
		panic(err)
	}
	toService, err := grpc.NewClient(svcLis.Addr().String(), append(agent.DialOptions(0), creds)...)
	if err != nil {
		panic(err)
	}
	a, err := agent.New(toGateway, toService, agent.Options{Key: "thermostat-1", Logger: quiet})
	if err != nil {
		panic(err)
	}
	// Run keeps the tunnels open, reopening them if they fail, until the
	// agent is stopped.
	ran := make(chan error, 1)
	go func() { ran <- a.Run(context.Background()) }()

	// Calls made before the agent's first tunnel is open would fail with
	// Unavailable, so wait (with a bound) until the gateway has one.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := gw.Agent("thermostat-1").WaitForReady(ctx); err != nil {
		panic(err)
	}

	// A client calls the gateway's address as if it were the service, and
	// names the agent in the tunnel-key header.
	client, err := grpc.NewClient(gwLis.Addr().String(), creds)
	if err != nil {
		panic(err)
	}
	callCtx := metadata.AppendToOutgoingContext(ctx, agent.DefaultKeyHeader, "thermostat-1")
	resp, err := healthpb.NewHealthClient(client).Check(callCtx, &healthpb.HealthCheckRequest{Service: "thermostat"})
	if err != nil {
		panic(err)
	}
	fmt.Println("thermostat:", resp.GetStatus())

	// Shut down from the client inwards. GracefulStop lets calls in
	// progress finish, closes the tunnels, and makes Run return nil.
	_ = client.Close()
	a.GracefulStop()
	if err := <-ran; err != nil {
		panic(err)
	}
	// The agent closes neither of its connections: that is for its owner.
	_ = toGateway.Close()
	_ = toService.Close()
	gw.Shutdown()
	gwServer.GracefulStop()
	svc.GracefulStop()

	// Output:
	// thermostat: SERVING
}
