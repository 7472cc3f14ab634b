package tunnel_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// serve starts a gRPC server with the tunnel service on loopback and returns
// a connection to it and a function that tears both down.
func serve(handler *tunnel.TunnelServiceHandler) (*grpc.ClientConn, func()) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	server := grpc.NewServer()
	tunnelpb.RegisterTunnelServiceServer(server, handler.Service())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = server.Serve(lis)
	}()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	return conn, func() {
		_ = conn.Close()
		server.Stop()
		<-done
	}
}

// A forward tunnel: the server registers services on its handler, and the
// client calls them through a channel that always reaches that server.
func ExampleNewChannel() {
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
	healthpb.RegisterHealthServer(handler, health.NewServer())
	conn, stop := serve(handler)
	defer stop()

	ctx := context.Background()
	ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer ch.Close()

	resp, err := healthpb.NewHealthClient(ch).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("through the tunnel:", resp.GetStatus())
	// Output: through the tunnel: SERVING
}

// A reverse tunnel: the client dials out and serves; the server calls it.
func ExampleNewReverseTunnelServer() {
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		// Group tunnels by a header the client sends when it opens one.
		// Real deployments derive the key from authenticated identity.
		AffinityKey: func(ch tunnel.TunnelChannel) any {
			md, _ := metadata.FromIncomingContext(ch.Context())
			return md.Get("device-id")[0]
		},
	})
	conn, stop := serve(handler)
	defer stop()

	// The client side, possibly behind NAT.
	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	healthpb.RegisterHealthServer(rs, health.NewServer())
	served := make(chan error, 1)
	go func() {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "device-id", "sensor-7")
		_, err := rs.Serve(ctx)
		served <- err
	}()

	// The server side calls back into the client.
	ctx := context.Background()
	device := handler.KeyAsChannel("sensor-7")
	if err := device.WaitForReady(ctx); err != nil {
		log.Fatal(err)
	}
	resp, err := healthpb.NewHealthClient(device).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("sensor-7 says:", resp.GetStatus())

	rs.GracefulStop()
	fmt.Println("Serve returned:", <-served)
	// Output:
	// sensor-7 says: SERVING
	// Serve returned: <nil>
}

// A handler both serves forward tunnels and keeps reverse tunnels; register
// it with any *grpc.Server.
func ExampleNewTunnelServiceHandler() {
	opened, closed := make(chan struct{}), make(chan struct{})
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		OnReverseTunnelOpen: func(tunnel.TunnelChannel) {
			fmt.Println("reverse tunnel open")
			close(opened)
		},
		OnReverseTunnelClose: func(tunnel.TunnelChannel) {
			fmt.Println("reverse tunnel closed")
			close(closed)
		},
	})
	conn, stop := serve(handler)
	defer stop()

	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	healthpb.RegisterHealthServer(rs, health.NewServer())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_, _ = rs.Serve(context.Background())
	}()
	// The tunnel is ready for calls (and listed) just before the callback
	// runs, so wait for the callback rather than with WaitForReady.
	<-opened
	fmt.Println("open reverse tunnels:", len(handler.AllReverseTunnels()))
	rs.Stop()
	<-served
	<-closed
	fmt.Println("open reverse tunnels:", len(handler.AllReverseTunnels()))
	// Output:
	// reverse tunnel open
	// open reverse tunnels: 1
	// reverse tunnel closed
	// open reverse tunnels: 0
}

// Interceptors as tunnel options: the handler's chain wraps every call to
// the services registered on it, first interceptor outermost, and the
// channel's wraps every call made on it.
func ExampleWithChainUnaryInterceptor() {
	logging := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		fmt.Println("server: call to", info.FullMethod)
		return next(ctx, req)
	}
	auth := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		if len(md.Get("authorization")) == 0 {
			return nil, status.Error(codes.Unauthenticated, "no credentials")
		}
		fmt.Println("server: credentials present")
		return next(ctx, req)
	}
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		TunnelOptions: []tunnel.TunnelOption{tunnel.WithChainUnaryInterceptor(logging, auth)},
	})
	healthpb.RegisterHealthServer(handler, health.NewServer())
	conn, stop := serve(handler)
	defer stop()

	addCredentials := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		fmt.Println("client: adding credentials")
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer example")
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	ctx := context.Background()
	stub := tunnelpb.NewTunnelServiceClient(conn)
	ch, err := tunnel.NewChannel(stub, tunnel.WithChainClientUnaryInterceptor(addCredentials)).Start(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer ch.Close()
	resp, err := healthpb.NewHealthClient(ch).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("client:", resp.GetStatus())

	// A channel without the client interceptor is refused.
	bare, err := tunnel.NewChannel(stub).Start(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer bare.Close()
	_, err = healthpb.NewHealthClient(bare).Check(ctx, &healthpb.HealthCheckRequest{})
	fmt.Println("client:", status.Code(err))
	// Output:
	// client: adding credentials
	// server: call to /grpc.health.v1.Health/Check
	// server: credentials present
	// client: SERVING
	// server: call to /grpc.health.v1.Health/Check
	// client: Unauthenticated
}

// OpenTelemetry through a tunnel: otelgrpc's handlers, given to the ends as
// stats handlers, trace tunneled calls as they trace direct ones. The
// calling end gets the client handler, the handling end the server handler;
// the span context travels in the call's metadata.
func ExampleWithClientStatsHandler() {
	// Spans go to an in-memory recorder here; use an exporter in production.
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	otelOpts := []otelgrpc.Option{
		otelgrpc.WithTracerProvider(tp),
		otelgrpc.WithPropagators(propagation.TraceContext{}),
	}

	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		TunnelOptions: []tunnel.TunnelOption{
			tunnel.WithStatsHandler(otelgrpc.NewServerHandler(otelOpts...)),
		},
	})
	healthpb.RegisterHealthServer(handler, health.NewServer())
	conn, stop := serve(handler)
	defer stop()

	ctx := context.Background()
	stub := tunnelpb.NewTunnelServiceClient(conn)
	ch, err := tunnel.NewChannel(stub, tunnel.WithClientStatsHandler(otelgrpc.NewClientHandler(otelOpts...))).Start(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer ch.Close()
	if _, err := healthpb.NewHealthClient(ch).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		log.Fatal(err)
	}

	// The server span ends once the handler has returned, which may be
	// after the caller has its response: wait for both spans.
	for deadline := time.Now().Add(5 * time.Second); len(rec.Ended()) < 2 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	var client, server sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		switch s.SpanKind() {
		case trace.SpanKindClient:
			client = s
		case trace.SpanKindServer:
			server = s
		}
	}
	fmt.Println("client span:", client.Name())
	fmt.Println("server span:", server.Name())
	fmt.Println("server span's parent is the client span:", server.Parent().SpanID() == client.SpanContext().SpanID())
	// Output:
	// client span: grpc.health.v1.Health/Check
	// server span: grpc.health.v1.Health/Check
	// server span's parent is the client span: true
}

// A client behind NAT runs ServeWithReconnect for its whole life: it keeps
// its reverse tunnels open, and opens each again, after a short jittered
// delay, whenever it ends.
func ExampleReverseTunnelServer_ServeWithReconnect() {
	open := make(chan tunnel.TunnelChannel, 4)
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		OnReverseTunnelOpen: func(ch tunnel.TunnelChannel) { open <- ch },
	})
	conn, stop := serve(handler)
	defer stop()

	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	healthpb.RegisterHealthServer(rs, health.NewServer())
	served := make(chan error, 1)
	go func() {
		served <- rs.ServeWithReconnect(context.Background(), tunnel.ReconnectOptions{
			Tunnels:    2,
			MinBackoff: 10 * time.Millisecond,
		})
	}()

	// The server drops both tunnels, as a restarting server would.
	for range 2 {
		(<-open).Close()
	}
	// The client opens them again.
	for range 2 {
		<-open
	}
	fmt.Println("reverse tunnels:", len(handler.AllReverseTunnels()))
	resp, err := healthpb.NewHealthClient(handler.AsChannel()).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("the client says:", resp.GetStatus())

	rs.GracefulStop()
	fmt.Println("ServeWithReconnect returned:", <-served)
	// Output:
	// reverse tunnels: 2
	// the client says: SERVING
	// ServeWithReconnect returned: <nil>
}
