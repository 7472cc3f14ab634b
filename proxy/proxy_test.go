package proxy_test

import (
	"context"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve starts a gRPC server on loopback with opts and register, and
// returns a client connection to it; both are closed at cleanup.
func serve(t *testing.T, register func(*grpc.Server), opts ...grpc.ServerOption) *grpc.ClientConn {
	t.Helper()
	srv := grpc.NewServer(opts...)
	if register != nil {
		register(srv)
	}
	return loopback.Serve(t, srv)
}

// to forwards every call to backend with the incoming metadata.
func to(backend grpc.ClientConnInterface) proxy.Director {
	return func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		return proxy.To(backend, md.Copy()), nil
	}
}

func testService(s *grpc.Server) {
	grpchantesting.RegisterTestServiceServer(s, &grpchantesting.TestServer{})
}

// TestChannelCases runs grpchan's channel cases through the proxy to an
// ordinary gRPC backend and to backends behind forward and reverse tunnels.
func TestChannelCases(t *testing.T) {
	t.Run("grpc backend", func(t *testing.T) {
		backend := serve(t, testService)
		front := serve(t, nil, proxy.ServerOptions(to(backend))...)
		grpchantesting.RunChannelTestCases(t, front, true)
	})
	t.Run("forward tunnel backend", func(t *testing.T) {
		handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
		grpchantesting.RegisterTestServiceServer(handler, &grpchantesting.TestServer{})
		conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
		ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		front := serve(t, nil, proxy.ServerOptions(to(ch))...)
		grpchantesting.RunChannelTestCases(t, front, true)
	})
	t.Run("reverse tunnel backend", func(t *testing.T) {
		handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
		conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
		rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
		grpchantesting.RegisterTestServiceServer(rs, &grpchantesting.TestServer{})
		served := make(chan struct{})
		go func() {
			defer close(served)
			_, _ = rs.Serve(context.Background())
		}()
		defer func() {
			rs.Stop()
			<-served
		}()
		if err := handler.AsChannel().WaitForReady(context.Background()); err != nil {
			t.Fatal(err)
		}
		front := serve(t, nil, proxy.ServerOptions(to(handler.AsChannel()))...)
		grpchantesting.RunChannelTestCases(t, front, true)
	})
}

// headerFirst is a bidi method whose handler sends its headers and then
// waits for the client's first message, or fails at once after setting
// headers when asked to.
var headerFirst = grpc.ServiceDesc{
	ServiceName: "proxytest.HeaderFirst",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Chat",
		ServerStreams: true,
		ClientStreams: true,
		Handler: func(_ any, ss grpc.ServerStream) error {
			md, _ := metadata.FromIncomingContext(ss.Context())
			if len(md.Get("fail")) > 0 {
				_ = ss.SetHeader(metadata.Pairs("h", "set before failing"))
				ss.SetTrailer(metadata.Pairs("t", "why"))
				return status.Error(codes.FailedPrecondition, "failing before any message")
			}
			if err := ss.SendHeader(metadata.Pairs("h", "early")); err != nil {
				return err
			}
			m := new(wrapperspb.StringValue)
			if err := ss.RecvMsg(m); err != nil {
				return err
			}
			return ss.SendMsg(m)
		},
	}},
}

func TestHeadersGoThroughAtOnce(t *testing.T) {
	backend := serve(t, func(s *grpc.Server) { s.RegisterService(&headerFirst, struct{}{}) })
	front := serve(t, nil, proxy.ServerOptions(to(backend))...)
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

	t.Run("before any message", func(t *testing.T) {
		cs, err := front.NewStream(context.Background(), desc, "/proxytest.HeaderFirst/Chat")
		if err != nil {
			t.Fatal(err)
		}
		// The backend waits for a message; its headers must arrive first.
		hdr, err := cs.Header()
		if err != nil || hdr.Get("h")[0] != "early" {
			t.Fatalf("headers %v, %v", hdr, err)
		}
		if err := cs.SendMsg(wrapperspb.String("hi")); err != nil {
			t.Fatal(err)
		}
		got := new(wrapperspb.StringValue)
		if err := cs.RecvMsg(got); err != nil || got.GetValue() != "hi" {
			t.Fatalf("echo %q, %v", got.GetValue(), err)
		}
		_ = cs.CloseSend()
	})
	t.Run("on an error", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "fail", "yes")
		cs, err := front.NewStream(ctx, desc, "/proxytest.HeaderFirst/Chat")
		if err != nil {
			t.Fatal(err)
		}
		hdr, err := cs.Header()
		if err != nil || len(hdr.Get("h")) != 1 {
			t.Fatalf("headers %v, %v", hdr, err)
		}
		err = cs.RecvMsg(new(wrapperspb.StringValue))
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("status %v", err)
		}
		if got := cs.Trailer().Get("t"); len(got) != 1 || got[0] != "why" {
			t.Fatalf("trailer %v", cs.Trailer())
		}
	})
}

func TestDirectorRefuses(t *testing.T) {
	front := serve(t, nil, proxy.ServerOptions(func(context.Context, *proxy.Call) (proxy.Route, error) {
		return proxy.Route{}, status.Error(codes.Unavailable, "no backend for that")
	})...)
	err := front.Invoke(context.Background(), "/any.Service/Method", wrapperspb.String("x"), new(wrapperspb.StringValue))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("got %v; want the director's Unavailable", err)
	}
}

// TestTunnelServerForwards puts the proxy behind tunnels as their unknown
// service handler: a reverse tunnel server (the shape of an agent behind
// NAT) and a forward tunnel handler both forward every call to a local
// gRPC backend they know nothing about.
func TestTunnelServerForwards(t *testing.T) {
	backend := serve(t, testService)
	proxying := []tunnel.TunnelOption{
		tunnel.WithUnknownServiceHandler(proxy.Handler(to(backend))),
		tunnel.WithCodec(proxy.Codec()),
	}
	t.Run("reverse", func(t *testing.T) {
		handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
		conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
		agent := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn), proxying...)
		served := make(chan struct{})
		go func() {
			defer close(served)
			_, _ = agent.Serve(context.Background())
		}()
		defer func() {
			agent.Stop()
			<-served
		}()
		if err := handler.AsChannel().WaitForReady(context.Background()); err != nil {
			t.Fatal(err)
		}
		grpchantesting.RunChannelTestCases(t, handler.AsChannel(), true)
	})
	t.Run("forward", func(t *testing.T) {
		handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{TunnelOptions: proxying})
		conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
		ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		grpchantesting.RunChannelTestCases(t, ch, true)
	})
}

// TestTunnelsThroughProxy opens tunnels through the proxy itself: the
// proxy knows nothing of TunnelService, and forwards its long-lived
// bidirectional calls one to one to the tunnel handler behind it.
func TestTunnelsThroughProxy(t *testing.T) {
	t.Run("reverse", func(t *testing.T) {
		handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
		backend := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
		front := serve(t, nil, proxy.ServerOptions(to(backend))...)
		rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(front))
		grpchantesting.RegisterTestServiceServer(rs, &grpchantesting.TestServer{})
		served := make(chan struct{})
		go func() {
			defer close(served)
			_, _ = rs.Serve(context.Background())
		}()
		defer func() {
			rs.Stop()
			<-served
		}()
		if err := handler.AsChannel().WaitForReady(context.Background()); err != nil {
			t.Fatal(err)
		}
		grpchantesting.RunChannelTestCases(t, handler.AsChannel(), true)
	})
	t.Run("forward", func(t *testing.T) {
		handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
		grpchantesting.RegisterTestServiceServer(handler, &grpchantesting.TestServer{})
		backend := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
		front := serve(t, nil, proxy.ServerOptions(to(backend))...)
		ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(front)).Start(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		grpchantesting.RunChannelTestCases(t, ch, true)
	})
}
