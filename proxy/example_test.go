package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// listen starts a gRPC server on loopback and returns a connection to it
// and a function that closes both.
func listen(register func(*grpc.Server), opts ...grpc.ServerOption) (*grpc.ClientConn, func()) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	srv := grpc.NewServer(opts...)
	if register != nil {
		register(srv)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	return conn, func() {
		_ = conn.Close()
		srv.Stop()
		<-done
	}
}

// healthBackend serves the standard health service, reporting st.
func healthBackend(st healthpb.HealthCheckResponse_ServingStatus) (*grpc.ClientConn, func()) {
	return listen(func(s *grpc.Server) {
		h := health.NewServer()
		h.SetServingStatus("", st)
		healthpb.RegisterHealthServer(s, h)
	})
}

// A one-to-one proxy: every call the front server does not serve itself
// goes to one backend, unchanged. The proxy knows nothing of the health
// service it forwards.
func ExampleHandler() {
	backend, stopBackend := healthBackend(healthpb.HealthCheckResponse_SERVING)
	defer stopBackend()

	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.To(backend, md.Copy()), nil
	}
	front, stopFront := listen(nil,
		grpc.ForceServerCodecV2(proxy.Codec()),
		grpc.UnknownServiceHandler(proxy.Handler(director)),
	) // or, shorter: listen(nil, proxy.ServerOptions(director)...)
	defer stopFront()

	resp, err := healthpb.NewHealthClient(front).Check(context.Background(), &healthpb.HealthCheckRequest{})
	fmt.Println(resp.GetStatus(), err)
	// Output: SERVING <nil>
}

// A fan-out: one health check asked of three backends, one of which is
// not connected. The client calls the unary method as a server-streaming
// one and gets one labelled result per backend. It decodes each result with
// the response's own type, which keeps the label among its unknown fields,
// and reads the label with SplitLabel.
func Example_fanOut() {
	eu, stopEU := healthBackend(healthpb.HealthCheckResponse_SERVING)
	defer stopEU()
	us, stopUS := healthBackend(healthpb.HealthCheckResponse_NOT_SERVING)
	defer stopUS()

	const labelField = 1000 // a field number HealthCheckResponse does not use
	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.Route{
			Backends: []proxy.Backend{
				{Name: "eu", Conn: eu},
				{Name: "us", Conn: us},
				{Name: "asia", Conn: nil}, // not connected
			},
			Metadata: md.Copy(),
		}, nil
	}
	front, stopFront := listen(nil, proxy.ServerOptions(director, proxy.WithLabelField(labelField))...)
	defer stopFront()

	desc := &grpc.StreamDesc{ServerStreams: true}
	cs, err := front.NewStream(context.Background(), desc, healthpb.Health_Check_FullMethodName)
	if err != nil {
		panic(err)
	}
	if err := cs.SendMsg(&healthpb.HealthCheckRequest{}); err != nil {
		panic(err)
	}
	var results []string
	for {
		resp := new(healthpb.HealthCheckResponse)
		err := cs.RecvMsg(resp)
		if errors.Is(err, io.EOF) {
			break // every backend has answered
		}
		if err != nil {
			panic(err)
		}
		_, label, err := proxy.SplitLabel(resp.ProtoReflect().GetUnknown(), labelField)
		if err != nil {
			panic(err)
		}
		if st := label.GetStatus(); st != nil {
			results = append(results, fmt.Sprintf("%s: failed with %s", label.GetBackend(), status.FromProto(st).Code()))
		} else {
			results = append(results, fmt.Sprintf("%s: %s", label.GetBackend(), resp.GetStatus()))
		}
	}
	slices.Sort(results) // results arrive in no particular order
	for _, r := range results {
		fmt.Println(r)
	}
	// Output:
	// asia: failed with Unavailable
	// eu: SERVING
	// us: NOT_SERVING
}
