package proxy_test

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// healthAt serves the health service, reporting st, on a loopback port, and
// returns its address and a function that stops it.
func healthAt(st healthpb.HealthCheckResponse_ServingStatus) (addr string, stop func()) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	srv := grpc.NewServer()
	h := health.NewServer()
	h.SetServingStatus("", st)
	healthpb.RegisterHealthServer(srv, h)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	return lis.Addr().String(), func() {
		srv.Stop()
		<-done
	}
}

// A proxy that routes each call to the backend address the client names
// in its metadata, as gRPCat does, with gRPCat's ConnectionCache become a
// ConnCache. Where gRPCat writes
//
//	cache := proxy.NewConnectionCache(ka, creds, dialOpts)
//	conn, err := cache.Get(backend) // *grpc.ClientConn
//	forwarder.Forward(ctx, method, stream, backend, md, firstFrame)
//
// this package's director returns the cache's connection as the route,
// and Handler does the forwarding. The cache also closes connections no
// call has used for a while, which gRPCat's keeps for ever.
func ExampleConnCache() {
	eu, stopEU := healthAt(healthpb.HealthCheckResponse_SERVING)
	defer stopEU()
	us, stopUS := healthAt(healthpb.HealthCheckResponse_NOT_SERVING)
	defer stopUS()

	cache := proxy.NewConnCache(
		proxy.CacheKeepalive(keepalive.ClientParameters{Time: 5 * time.Minute}),
		// proxy.CacheCredentials(creds) for TLS backends; plaintext without.
		proxy.CacheIdleTimeout(10*time.Minute),
	)
	defer cache.Close()

	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		addr := md.Get("x-backend")
		if len(addr) != 1 {
			return proxy.Route{}, status.Error(codes.InvalidArgument, "name one backend in x-backend")
		}
		conn, err := cache.Get(addr[0]) // dialled on first use, then shared
		if err != nil {
			return proxy.Route{}, err
		}
		md = md.Copy()
		delete(md, "x-backend") // the proxy's business, not the backend's
		return proxy.To(conn, md), nil
	}
	front, stopFront := listen(nil, proxy.ServerOptions(director)...)
	defer stopFront()

	client := healthpb.NewHealthClient(front)
	for _, addr := range []string{eu, us, eu} {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "x-backend", addr)
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		fmt.Println(resp.GetStatus(), err)
	}
	_, err := client.Check(context.Background(), &healthpb.HealthCheckRequest{})
	fmt.Println(status.Code(err))

	// A backend known to be gone: close its connection now rather than
	// when it has been idle long enough.
	cache.Remove(us)
	// Output:
	// SERVING <nil>
	// NOT_SERVING <nil>
	// SERVING <nil>
	// InvalidArgument
}
