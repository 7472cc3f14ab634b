package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

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

// A migration from siderolabs/grpc-proxy, the way Talos's apid directs
// calls: the "nodes" metadata lists the nodes a call goes to, and a call
// that lists any is One2Many, even with one node, so that the client always
// gets replies of one shape. The services follow Talos's convention (every
// reply names its node in a common.Metadata), and the Talos responder
// fills it in as siderolabs' One2ManyResponder's AppendInfo and BuildError
// do. Where grpc-proxy's WithStreamedDetector told it which methods stream,
// the director sets Route.Unary, here from the methods' descriptors; the
// unary Version then merges every node's replies into one response, and a
// plain unary client reads them. (The service here is built at run time,
// see talos_test.go; a real one has generated code.)
func ExampleTalosResponder() {
	nodes := map[string]grpc.ClientConnInterface{}
	for _, n := range []struct {
		addr string
		fail *status.Status
	}{
		{"10.5.0.2", nil},
		{"10.5.0.3", status.New(codes.Unavailable, "node is rebooting")},
	} {
		conn, stop := listen(nil, grpc.UnknownServiceHandler(talosService(n.addr, n.fail)))
		defer stop()
		nodes[n.addr] = conn
	}
	local := nodes["10.5.0.2"]

	director := func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		md = md.Copy()
		targets := md.Get("nodes")
		md.Delete("nodes") // the nodes must not forward the call again
		if len(targets) == 0 {
			return proxy.To(local, md), nil // One2One, untouched
		}
		route := proxy.Route{
			Metadata: md,
			FanOut:   true, // One2Many even with one node
			Unary:    isUnary(call.Method()),
		}
		for _, addr := range targets {
			// An unknown node gets a nil Conn: it fails as a reply of
			// its own, not the whole call.
			route.Backends = append(route.Backends, proxy.Backend{Name: addr, Conn: nodes[addr]})
		}
		return route, nil
	}
	front, stopFront := listen(nil, proxy.ServerOptions(director, proxy.WithResponder(proxy.TalosResponder()))...)
	defer stopFront()

	ctx := metadata.AppendToOutgoingContext(context.Background(), "nodes", "10.5.0.2", "nodes", "10.5.0.3")
	resp := dynamicpb.NewMessage(talos().response)
	var trailer metadata.MD
	if err := front.Invoke(ctx, talosVersion, wrapperspb.String("v1.9"), resp, grpc.Trailer(&trailer)); err != nil {
		panic(err)
	}
	for _, r := range readResponse(resp) {
		fmt.Println(r)
	}
	fmt.Println(trailer.Get(proxy.FanOutFailedTrailer)[0], "of", trailer.Get(proxy.FanOutBackendsTrailer)[0], "nodes failed")

	// One node, the same shape.
	ctx = metadata.AppendToOutgoingContext(context.Background(), "nodes", "10.5.0.2")
	resp = dynamicpb.NewMessage(talos().response)
	if err := front.Invoke(ctx, talosVersion, wrapperspb.String("v1.9"), resp); err != nil {
		panic(err)
	}
	fmt.Println(readResponse(resp))
	// Output:
	// 10.5.0.2: 10.5.0.2 v1.9
	// 10.5.0.3: rpc error: code = Unavailable desc = node is rebooting (Unavailable)
	// 1 of 2 nodes failed
	// [10.5.0.2: 10.5.0.2 v1.9]
}
