package tunnel

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// testServer is a real gRPC server on loopback with a TunnelServiceHandler.
type testServer struct {
	handler *TunnelServiceHandler
	server  *grpc.Server
	conn    *grpc.ClientConn
	stub    tunnelpb.TunnelServiceClient
}

// registrar registers the services a test wants on a tunnel server.
type registrar func(grpc.ServiceRegistrar)

// testServices registers grpchantesting's TestServer and, if p is not nil,
// the probe service.
func testServices(p *probe) registrar {
	return func(r grpc.ServiceRegistrar) {
		grpchantesting.RegisterTestServiceServer(r, &grpchantesting.TestServer{})
		if p != nil {
			r.RegisterService(&probeDesc, p)
		}
	}
}

// startServer starts a gRPC server on loopback with a tunnel handler that
// serves reg's services on forward tunnels, and dials it.
func startServer(t testing.TB, opts TunnelServiceHandlerOptions, reg registrar, serverOpts ...grpc.ServerOption) *testServer {
	t.Helper()
	return startServerWith(t, opts, reg, nil, serverOpts...)
}

// startServerWith is startServer that also registers direct's services on
// the gRPC server itself, for calls that bypass tunnels.
func startServerWith(t testing.TB, opts TunnelServiceHandlerOptions, reg, direct registrar, serverOpts ...grpc.ServerOption) *testServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{handler: NewTunnelServiceHandler(opts), server: grpc.NewServer(serverOpts...)}
	if reg != nil {
		reg(ts.handler)
	}
	tunnelpb.RegisterTunnelServiceServer(ts.server, ts.handler.Service())
	if direct != nil {
		direct(ts.server)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = ts.server.Serve(lis)
	}()
	ts.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ts.stub = tunnelpb.NewTunnelServiceClient(ts.conn)
	t.Cleanup(func() {
		_ = ts.conn.Close()
		ts.server.Stop()
		<-served
	})
	return ts
}

// forward opens a forward tunnel over stub, closed at cleanup.
func forward(t testing.TB, stub tunnelpb.TunnelServiceClient, opts ...TunnelOption) TunnelChannel {
	t.Helper()
	ch, err := NewChannel(stub, opts...).Start(context.Background())
	if err != nil {
		t.Fatalf("opening forward tunnel: %v", err)
	}
	t.Cleanup(ch.Close)
	return ch
}

// reverse opens n reverse tunnels over stub serving reg's services, and
// waits until h sees them. The server is stopped at cleanup.
func reverse(t testing.TB, h *TunnelServiceHandler, stub tunnelpb.TunnelServiceClient, n int, reg registrar, opts ...TunnelOption) *ReverseTunnelServer {
	t.Helper()
	return reverseCtx(t, context.Background(), h, stub, n, reg, opts...)
}

func reverseCtx(t testing.TB, ctx context.Context, h *TunnelServiceHandler, stub tunnelpb.TunnelServiceClient, n int, reg registrar, opts ...TunnelOption) *ReverseTunnelServer {
	t.Helper()
	rs := NewReverseTunnelServer(stub, opts...)
	if reg != nil {
		reg(rs)
	}
	before := len(h.AllReverseTunnels())
	done := make(chan struct{}, n)
	for range n {
		go func() {
			defer func() { done <- struct{}{} }()
			_, _ = rs.Serve(ctx)
		}()
	}
	t.Cleanup(func() {
		rs.Stop()
		for range n {
			<-done
		}
	})
	waitFor(t, func() bool { return len(h.AllReverseTunnels()) >= before+n })
	return rs
}

// transport is one way of reaching a tunnel server's services.
type transport struct {
	name string
	// dial sets up servers and tunnels, serving reg's services, and returns
	// the channel to call them through. opts apply to both tunnel ends.
	dial func(t *testing.T, reg registrar, opts []TunnelOption) grpc.ClientConnInterface
}

// transports are every topology the library supports: forward and reverse
// tunnels, and each nested in a forward tunnel.
var transports = []transport{
	{"forward", func(t *testing.T, reg registrar, opts []TunnelOption) grpc.ClientConnInterface {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: opts}, reg)
		return forward(t, ts.stub, opts...)
	}},
	{"reverse", func(t *testing.T, reg registrar, opts []TunnelOption) grpc.ClientConnInterface {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: opts}, nil)
		reverse(t, ts.handler, ts.stub, 1, reg, opts...)
		return ts.handler.AsChannel()
	}},
	{"forward-in-forward", func(t *testing.T, reg registrar, opts []TunnelOption) grpc.ClientConnInterface {
		inner := NewTunnelServiceHandler(TunnelServiceHandlerOptions{TunnelOptions: opts})
		reg(inner)
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: opts}, func(r grpc.ServiceRegistrar) {
			tunnelpb.RegisterTunnelServiceServer(r, inner.Service())
		})
		outer := forward(t, ts.stub, opts...)
		return forward(t, tunnelpb.NewTunnelServiceClient(outer), opts...)
	}},
	{"reverse-in-forward", func(t *testing.T, reg registrar, opts []TunnelOption) grpc.ClientConnInterface {
		inner := NewTunnelServiceHandler(TunnelServiceHandlerOptions{TunnelOptions: opts})
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: opts}, func(r grpc.ServiceRegistrar) {
			tunnelpb.RegisterTunnelServiceServer(r, inner.Service())
		})
		outer := forward(t, ts.stub, opts...)
		reverse(t, inner, tunnelpb.NewTunnelServiceClient(outer), 1, reg, opts...)
		return inner.AsChannel()
	}},
}

// probe is a test service whose behaviour each test supplies. Its methods
// carry wrapperspb.BytesValue messages.
type probe struct {
	unary  func(context.Context, *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error)
	stream func(grpc.ServerStream) error
}

const (
	probeUnary  = "/grpctunnel.test.Probe/Unary"
	probeStream = "/grpctunnel.test.Probe/Stream"
)

var probeStreamDesc = &grpc.StreamDesc{StreamName: "Stream", ServerStreams: true, ClientStreams: true}

var probeDesc = grpc.ServiceDesc{
	ServiceName: "grpctunnel.test.Probe",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Unary",
		Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			p := srv.(*probe)
			if interceptor == nil {
				return p.callUnary(ctx, in)
			}
			info := &grpc.UnaryServerInfo{Server: srv, FullMethod: probeUnary}
			return interceptor(ctx, in, info, func(ctx context.Context, req any) (any, error) {
				return p.callUnary(ctx, req.(*wrapperspb.BytesValue))
			})
		},
	}},
	Streams: []grpc.StreamDesc{{
		StreamName:    "Stream",
		ServerStreams: true,
		ClientStreams: true,
		Handler: func(srv any, stream grpc.ServerStream) error {
			return srv.(*probe).callStream(stream)
		},
	}},
}

// callUnary runs the test's unary behaviour; by default it echoes.
func (p *probe) callUnary(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	if p.unary == nil {
		return in, nil
	}
	return p.unary(ctx, in)
}

// callStream runs the test's streaming behaviour; by default it echoes every
// message until the client half-closes.
func (p *probe) callStream(ss grpc.ServerStream) error {
	if p.stream != nil {
		return p.stream(ss)
	}
	for {
		m := new(wrapperspb.BytesValue)
		if err := ss.RecvMsg(m); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		if err := ss.SendMsg(m); err != nil {
			return err
		}
	}
}

func bytesValue(b []byte) *wrapperspb.BytesValue { return wrapperspb.Bytes(b) }

// echoProbe is a probe whose unary method echoes.
func echoProbe() *probe {
	return &probe{unary: func(_ context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		return in, nil
	}}
}

// recvWithin receives from ch, failing the test if nothing arrives within
// 10 seconds.
func recvWithin[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}
