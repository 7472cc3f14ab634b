package proxy_test

import (
	"context"
	"fmt"
	"net"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// storage serves the health service reporting name as SERVING, like a
// Gitaly storage node, and returns a connection to it and a function that
// closes both.
func storage(name string) (*grpc.ClientConn, func()) {
	h := health.NewServer()
	h.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	return listen(func(s *grpc.Server) { healthpb.RegisterHealthServer(s, h) })
}

// A server that answers its own service and forwards some methods of
// another, as Gitaly's praefect does with proxy.RegisterService. Where
// Gitaly writes
//
//	srv := grpc.NewServer(grpc.ForceServerCodec(proxy.NewCodec()))
//	proxy.RegisterService(srv, director, "grpc.health.v1.Health", "Check")
//
// with a StreamDirector that peeks the first message and returns
// StreamParameters for its primary, here the director is a Director that
// returns a Route, and the server needs no codec option: RegisterService
// works with the default one, and passes messages through without copying
// under grpc.ForceServerCodecV2(proxy.Codec()).
func ExampleRegisterService() {
	storage1, stop1 := storage("storage-1")
	defer stop1()
	storage2, stop2 := storage("storage-2")
	defer stop2()

	// Route by a field of the request, as praefect routes by repository:
	// Peek reads the first message, which is still forwarded as it came.
	director := func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		data, err := call.Peek()
		if err != nil {
			return proxy.Route{}, err
		}
		req := new(healthpb.HealthCheckRequest)
		if err := proto.Unmarshal(data, req); err != nil {
			return proxy.Route{}, status.Errorf(codes.InvalidArgument, "%s: %v", call.Method(), err)
		}
		md, _ := metadata.FromIncomingContext(ctx)
		switch req.GetService() {
		case "storage-1":
			return proxy.To(storage1, md.Copy()), nil
		case "storage-2":
			return proxy.To(storage2, md.Copy()), nil
		}
		return proxy.Route{}, status.Errorf(codes.NotFound, "no storage %q", req.GetService())
	}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	srv := grpc.NewServer() // the default codec
	// The server's own service...
	grpchantesting.RegisterTestServiceServer(srv, &grpchantesting.TestServer{})
	// ...and Health's Check, forwarded; Health's Watch is not.
	proxy.RegisterService(srv, director, "grpc.health.v1.Health", "Check")
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	defer func() {
		srv.Stop()
		<-served
	}()

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	ctx := context.Background()

	healthClient := healthpb.NewHealthClient(conn)
	for _, name := range []string{"storage-1", "storage-2", "storage-3"} {
		resp, err := healthClient.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		fmt.Println(name, resp.GetStatus(), status.Code(err))
	}
	watch, err := healthClient.Watch(ctx, &healthpb.HealthCheckRequest{Service: "storage-1"})
	if err == nil {
		_, err = watch.Recv()
	}
	fmt.Println("Watch:", status.Code(err))

	own, err := grpchantesting.NewTestServiceClient(conn).Unary(ctx, &grpchantesting.Message{Payload: []byte("answered locally")})
	fmt.Println(string(own.GetPayload()), err)
	// Output:
	// storage-1 SERVING OK
	// storage-2 SERVING OK
	// storage-3 UNKNOWN NotFound
	// Watch: Unimplemented
	// answered locally <nil>
}
