package tunnel

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/fullstorydev/grpchan"
	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// callLog records what interceptors and handlers saw, in order.
type callLog struct {
	mu      sync.Mutex
	entries []string
}

func (l *callLog) add(e string) {
	l.mu.Lock()
	l.entries = append(l.entries, e)
	l.mu.Unlock()
}

// take returns the entries so far and clears the log.
func (l *callLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.entries
	l.entries = nil
	return out
}

func recUnaryServer(l *callLog, name string) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		l.add(name + ">")
		defer l.add("<" + name)
		return h(ctx, req)
	}
}

func recStreamServer(l *callLog, name string) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		l.add(name + ">")
		defer l.add("<" + name)
		return h(srv, ss)
	}
}

func recUnaryClient(l *callLog, name string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		l.add(name + ">")
		defer l.add("<" + name)
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

func recStreamClient(l *callLog, name string) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		l.add(name + ">")
		defer l.add("<" + name)
		return streamer(ctx, desc, cc, method, opts...)
	}
}

// interceptedSetup is a channel to services served with server options, the
// channel's end configured with client options.
type interceptedSetup struct {
	name string
	// dial serves reg's services on the end with serverOpts and returns a
	// channel configured with clientOpts.
	dial func(t *testing.T, reg registrar, serverOpts, clientOpts []TunnelOption) grpc.ClientConnInterface
}

var interceptedSetups = []interceptedSetup{
	{"forward", func(t *testing.T, reg registrar, serverOpts, clientOpts []TunnelOption) grpc.ClientConnInterface {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: serverOpts}, reg)
		return forward(t, ts.stub, clientOpts...)
	}},
	{"reverse", func(t *testing.T, reg registrar, serverOpts, clientOpts []TunnelOption) grpc.ClientConnInterface {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: clientOpts}, nil)
		reverse(t, ts.handler, ts.stub, 1, reg, serverOpts...)
		return ts.handler.AsChannel()
	}},
	{"reverse-by-key", func(t *testing.T, reg registrar, serverOpts, clientOpts []TunnelOption) grpc.ClientConnInterface {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: clientOpts}, nil)
		reverse(t, ts.handler, ts.stub, 1, reg, serverOpts...)
		return ts.handler.KeyAsChannel(nil)
	}},
	{"reverse-one-tunnel", func(t *testing.T, reg registrar, serverOpts, clientOpts []TunnelOption) grpc.ClientConnInterface {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: clientOpts}, nil)
		reverse(t, ts.handler, ts.stub, 1, reg, serverOpts...)
		return ts.handler.AllReverseTunnels()[0]
	}},
}

func TestInterceptorOptionsOrder(t *testing.T) {
	for _, s := range interceptedSetups {
		t.Run(s.name, func(t *testing.T) {
			// One log for both sides: a unary call's server chain runs
			// entirely within its client chain.
			var l callLog
			server, client := &l, &l
			p := &probe{
				unary: func(_ context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
					server.add("handler")
					return in, nil
				},
				stream: func(ss grpc.ServerStream) error {
					server.add("handler")
					m := new(wrapperspb.BytesValue)
					if err := ss.RecvMsg(m); err != nil {
						return err
					}
					return ss.SendMsg(m)
				},
			}
			serverOpts := []TunnelOption{
				WithChainUnaryInterceptor(recUnaryServer(server, "u1"), recUnaryServer(server, "u2")),
				WithUnaryInterceptor(recUnaryServer(server, "replaced")),
				WithUnaryInterceptor(recUnaryServer(server, "u0")),
				WithChainUnaryInterceptor(recUnaryServer(server, "u3")),
				WithChainStreamInterceptor(recStreamServer(server, "s1"), nil, recStreamServer(server, "s2")),
				WithStreamInterceptor(recStreamServer(server, "s0")),
				WithChainStreamInterceptor(recStreamServer(server, "s3")),
			}
			clientOpts := []TunnelOption{
				WithChainClientUnaryInterceptor(recUnaryClient(client, "cu1"), recUnaryClient(client, "cu2")),
				WithClientUnaryInterceptor(recUnaryClient(client, "cu0")),
				WithChainClientUnaryInterceptor(recUnaryClient(client, "cu3")),
				WithChainClientStreamInterceptor(recStreamClient(client, "cs1"), recStreamClient(client, "cs2")),
				WithClientStreamInterceptor(recStreamClient(client, "cs0")),
				WithChainClientStreamInterceptor(recStreamClient(client, "cs3")),
			}
			cc := s.dial(t, testServices(p), serverOpts, clientOpts)
			ctx := context.Background()

			if err := cc.Invoke(ctx, probeUnary, bytesValue([]byte("x")), new(wrapperspb.BytesValue)); err != nil {
				t.Fatal(err)
			}
			want := "[cu0> cu1> cu2> cu3> u0> u1> u2> u3> handler <u3 <u2 <u1 <u0 <cu3 <cu2 <cu1 <cu0]"
			if got := fmt.Sprint(l.take()); got != want {
				t.Errorf("unary interceptors ran %s, want %s", got, want)
			}

			// Streaming.
			cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
			if err != nil {
				t.Fatal(err)
			}
			if err := cs.SendMsg(bytesValue([]byte("x"))); err != nil {
				t.Fatal(err)
			}
			if err := cs.CloseSend(); err != nil {
				t.Fatal(err)
			}
			if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
				t.Fatal(err)
			}
			if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
				t.Fatalf("end of stream: %v", err)
			}
			// The server's side may start before the client's streamer
			// returns: compare each side's order.
			clientSide, serverSide := split(l.take(), "c")
			want = "[cs0> cs1> cs2> cs3> <cs3 <cs2 <cs1 <cs0]"
			if got := fmt.Sprint(clientSide); got != want {
				t.Errorf("stream client interceptors ran %s, want %s", got, want)
			}
			want = "[s0> s1> s2> s3> handler <s3 <s2 <s1 <s0]"
			if got := fmt.Sprint(serverSide); got != want {
				t.Errorf("stream server interceptors ran %s, want %s", got, want)
			}
		})
	}
}

// TestInterceptorOptionsWithGrpchan combines the options with grpchan's
// wrappers: the wrappers keep working, grpchan's client interceptor outside
// the channel's and grpchan's server interceptor inside the tunnel end's.
func TestInterceptorOptionsWithGrpchan(t *testing.T) {
	for _, s := range interceptedSetups {
		t.Run(s.name, func(t *testing.T) {
			var l callLog
			reg := func(r grpc.ServiceRegistrar) {
				r = grpchan.WithInterceptor(r, recUnaryServer(&l, "grpchan-server"), recStreamServer(&l, "grpchan-server"))
				grpchantesting.RegisterTestServiceServer(r, &grpchantesting.TestServer{})
			}
			cc := s.dial(t, reg,
				[]TunnelOption{WithUnaryInterceptor(recUnaryServer(&l, "server")), WithStreamInterceptor(recStreamServer(&l, "server"))},
				[]TunnelOption{WithClientUnaryInterceptor(recUnaryClient(&l, "client")), WithClientStreamInterceptor(recStreamClient(&l, "client"))})
			cc = grpchan.InterceptClientConn(cc, recUnaryClient(&l, "grpchan-client"), recStreamClient(&l, "grpchan-client"))
			cli := grpchantesting.NewTestServiceClient(cc)
			if _, err := cli.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
				t.Fatal(err)
			}
			want := "[grpchan-client> client> server> grpchan-server> <grpchan-server <server <client <grpchan-client]"
			if got := fmt.Sprint(l.take()); got != want {
				t.Errorf("unary: %s, want %s", got, want)
			}
			ss, err := cli.ServerStream(context.Background(), &grpchantesting.Message{Count: 1})
			if err != nil {
				t.Fatal(err)
			}
			for {
				if _, err := ss.Recv(); err == io.EOF {
					break
				} else if err != nil {
					t.Fatal(err)
				}
			}
			client, server := split(l.take(), "client")
			want = "[grpchan-client> client> <client <grpchan-client] [server> grpchan-server> <grpchan-server <server]"
			if got := fmt.Sprint(client, server); got != want {
				t.Errorf("stream: %s, want %s", got, want)
			}
		})
	}
}

// split separates the entries that contain sub from the others.
func split(entries []string, sub string) (with, without []string) {
	for _, e := range entries {
		if strings.Contains(e, sub) {
			with = append(with, e)
		} else {
			without = append(without, e)
		}
	}
	return with, without
}

// TestInterceptorInfo checks what server interceptors are told about each
// kind of call.
func TestInterceptorInfo(t *testing.T) {
	for _, s := range interceptedSetups[:2] {
		t.Run(s.name, func(t *testing.T) {
			impl := &grpchantesting.TestServer{}
			var mu sync.Mutex
			var unaryInfo *grpc.UnaryServerInfo
			var streamInfo []grpc.StreamServerInfo
			var streamSrv []any
			serverOpts := []TunnelOption{
				WithUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
					mu.Lock()
					unaryInfo = info
					mu.Unlock()
					return h(ctx, req)
				}),
				WithStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
					mu.Lock()
					streamInfo = append(streamInfo, *info)
					streamSrv = append(streamSrv, srv)
					mu.Unlock()
					return h(srv, ss)
				}),
			}
			cc := s.dial(t, func(r grpc.ServiceRegistrar) { grpchantesting.RegisterTestServiceServer(r, impl) }, serverOpts, nil)
			cli := grpchantesting.NewTestServiceClient(cc)
			ctx := context.Background()
			if _, err := cli.Unary(ctx, &grpchantesting.Message{}); err != nil {
				t.Fatal(err)
			}
			cs, err := cli.ClientStream(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := cs.CloseAndRecv(); err != nil {
				t.Fatal(err)
			}
			ss, err := cli.ServerStream(ctx, &grpchantesting.Message{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ss.Recv(); err != io.EOF {
				t.Fatal(err)
			}
			bs, err := cli.BidiStream(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := bs.CloseSend(); err != nil {
				t.Fatal(err)
			}
			if _, err := bs.Recv(); err != io.EOF {
				t.Fatal(err)
			}

			mu.Lock()
			defer mu.Unlock()
			if unaryInfo == nil || unaryInfo.FullMethod != "/grpchantesting.TestService/Unary" || unaryInfo.Server != impl {
				t.Errorf("unary info: %+v", unaryInfo)
			}
			want := []grpc.StreamServerInfo{
				{FullMethod: "/grpchantesting.TestService/ClientStream", IsClientStream: true},
				{FullMethod: "/grpchantesting.TestService/ServerStream", IsServerStream: true},
				{FullMethod: "/grpchantesting.TestService/BidiStream", IsClientStream: true, IsServerStream: true},
			}
			if !slices.Equal(streamInfo, want) {
				t.Errorf("stream infos %+v, want %+v", streamInfo, want)
			}
			for i, srv := range streamSrv {
				if srv != impl {
					t.Errorf("stream %d: interceptor got server %v, want the registered implementation", i, srv)
				}
			}
		})
	}
}

// TestInterceptorRejects: a status returned by an interceptor, on either
// side, reaches the caller, and the handler never runs.
func TestInterceptorRejects(t *testing.T) {
	deny := status.Error(codes.PermissionDenied, "not you")
	for _, s := range interceptedSetups[:2] {
		t.Run(s.name, func(t *testing.T) {
			var ran callLog
			p := &probe{
				unary: func(context.Context, *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
					ran.add("unary")
					return nil, nil
				},
				stream: func(grpc.ServerStream) error { ran.add("stream"); return nil },
			}
			check := func(what string, err error) {
				t.Helper()
				if status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "not you" {
					t.Errorf("%s: %v, want the interceptor's status", what, err)
				}
			}
			t.Run("server", func(t *testing.T) {
				cc := s.dial(t, testServices(p), []TunnelOption{
					WithUnaryInterceptor(func(context.Context, any, *grpc.UnaryServerInfo, grpc.UnaryHandler) (any, error) {
						return nil, deny
					}),
					WithStreamInterceptor(func(any, grpc.ServerStream, *grpc.StreamServerInfo, grpc.StreamHandler) error {
						return deny
					}),
				}, nil)
				check("unary", cc.Invoke(context.Background(), probeUnary, bytesValue(nil), new(wrapperspb.BytesValue)))
				cs, err := cc.NewStream(context.Background(), probeStreamDesc, probeStream)
				if err != nil {
					t.Fatal(err)
				}
				check("stream", cs.RecvMsg(new(wrapperspb.BytesValue)))
			})
			t.Run("client", func(t *testing.T) {
				cc := s.dial(t, testServices(p), nil, []TunnelOption{
					WithClientUnaryInterceptor(func(context.Context, string, any, any, *grpc.ClientConn, grpc.UnaryInvoker, ...grpc.CallOption) error {
						return deny
					}),
					WithClientStreamInterceptor(func(context.Context, *grpc.StreamDesc, *grpc.ClientConn, string, grpc.Streamer, ...grpc.CallOption) (grpc.ClientStream, error) {
						return nil, deny
					}),
				})
				check("unary", cc.Invoke(context.Background(), probeUnary, bytesValue(nil), new(wrapperspb.BytesValue)))
				_, err := cc.NewStream(context.Background(), probeStreamDesc, probeStream)
				check("stream", err)
			})
			if got := ran.take(); len(got) != 0 {
				t.Errorf("handlers ran: %v", got)
			}
		})
	}
}

type ctxKey struct{}

// ctxStream gives a handler a context of the interceptor's choosing.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s ctxStream) Context() context.Context { return s.ctx }

// TestInterceptorChangesContext: a client interceptor adds metadata, a
// server interceptor reads it and hands the handler a context value.
func TestInterceptorChangesContext(t *testing.T) {
	fromCtx := func(ctx context.Context) []byte {
		v, _ := ctx.Value(ctxKey{}).(string)
		return []byte(v)
	}
	p := &probe{
		unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
			return bytesValue(fromCtx(ctx)), nil
		},
		stream: func(ss grpc.ServerStream) error {
			return ss.SendMsg(bytesValue(fromCtx(ss.Context())))
		},
	}
	fromMD := func(ctx context.Context) string {
		md, _ := metadata.FromIncomingContext(ctx)
		return fmt.Sprint(md.Get("x-added"))
	}
	serverOpts := []TunnelOption{
		WithUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			return h(context.WithValue(ctx, ctxKey{}, "unary saw "+fromMD(ctx)), req)
		}),
		WithStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			ctx := ss.Context()
			return h(srv, ctxStream{ss, context.WithValue(ctx, ctxKey{}, "stream saw "+fromMD(ctx))})
		}),
	}
	clientOpts := []TunnelOption{
		WithClientUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, "x-added", "by-client"), method, req, reply, cc, opts...)
		}),
		WithClientStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			return streamer(metadata.AppendToOutgoingContext(ctx, "x-added", "by-client"), desc, cc, method, opts...)
		}),
	}
	for _, s := range interceptedSetups[:2] {
		t.Run(s.name, func(t *testing.T) {
			cc := s.dial(t, testServices(p), serverOpts, clientOpts)
			resp := new(wrapperspb.BytesValue)
			if err := cc.Invoke(context.Background(), probeUnary, bytesValue(nil), resp); err != nil {
				t.Fatal(err)
			}
			if got := string(resp.GetValue()); got != "unary saw [by-client]" {
				t.Errorf("unary handler got %q", got)
			}
			cs, err := cc.NewStream(context.Background(), probeStreamDesc, probeStream)
			if err != nil {
				t.Fatal(err)
			}
			if err := cs.RecvMsg(resp); err != nil {
				t.Fatal(err)
			}
			if got := string(resp.GetValue()); got != "stream saw [by-client]" {
				t.Errorf("stream handler got %q", got)
			}
			if err := cs.RecvMsg(resp); err != io.EOF {
				t.Fatal(err)
			}
		})
	}
}

// TestClientInterceptorSeesChannel: cc is nil, as a tunnel is not a
// *grpc.ClientConn; the tunnel is in the interceptor's context where the
// channel is one tunnel, and reported by the call where it is a set.
func TestClientInterceptorSeesChannel(t *testing.T) {
	type seen struct {
		cc     *grpc.ClientConn
		before TunnelChannel // TunnelChannelFromContext in the interceptor
		after  TunnelChannel // the tunnel that carried the call
	}
	var mu sync.Mutex
	var saw []seen
	clientOpts := []TunnelOption{
		WithClientUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			var carried TunnelChannel
			err := invoker(ctx, method, req, reply, cc, append(opts, WithTunnelChannel(&carried))...)
			mu.Lock()
			saw = append(saw, seen{cc, TunnelChannelFromContext(ctx), carried})
			mu.Unlock()
			return err
		}),
		WithClientStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			cs, err := streamer(ctx, desc, cc, method, opts...)
			var carried TunnelChannel
			if err == nil {
				carried = TunnelChannelFromContext(cs.Context())
			}
			mu.Lock()
			saw = append(saw, seen{cc, TunnelChannelFromContext(ctx), carried})
			mu.Unlock()
			return cs, err
		}),
	}
	call := func(t *testing.T, cc grpc.ClientConnInterface) {
		t.Helper()
		if err := cc.Invoke(context.Background(), probeUnary, bytesValue(nil), new(wrapperspb.BytesValue)); err != nil {
			t.Fatal(err)
		}
		cs, err := cc.NewStream(context.Background(), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		if err := cs.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
			t.Fatal(err)
		}
	}
	expect := func(t *testing.T, before, after TunnelChannel) {
		t.Helper()
		mu.Lock()
		got := saw
		saw = nil
		mu.Unlock()
		if len(got) != 2 {
			t.Fatalf("interceptors ran %d times, want 2", len(got))
		}
		for i, s := range got {
			if s.cc != nil || s.before != before || s.after != after {
				t.Errorf("call %d: interceptor saw cc %v, tunnel %v in context, %v carrying the call; want nil, %v, %v", i, s.cc, s.before, s.after, before, after)
			}
		}
	}

	t.Run("forward", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(&probe{}))
		ch := forward(t, ts.stub, clientOpts...)
		call(t, ch)
		expect(t, ch, ch)
	})
	t.Run("reverse", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: clientOpts}, nil)
		reverse(t, ts.handler, ts.stub, 1, testServices(&probe{}))
		tun := ts.handler.AllReverseTunnels()[0]
		// A channel over the set: the tunnel is picked by the invoker.
		call(t, ts.handler.AsChannel())
		expect(t, nil, tun)
		// One tunnel of the set: it is the channel.
		call(t, tun)
		expect(t, tun, tun)
	})
}

// TestInterceptorUnknownService: as in grpc-go, stream interceptors wrap
// the unknown-service handler, with both sides streaming and no server;
// unary interceptors do not.
func TestInterceptorUnknownService(t *testing.T) {
	const method = "/no.such.Service/Method"
	for _, s := range interceptedSetups[:2] {
		t.Run(s.name, func(t *testing.T) {
			var l callLog
			var mu sync.Mutex
			var info grpc.StreamServerInfo
			var srv any = "unset"
			serverOpts := []TunnelOption{
				WithUnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
					l.add("unknown")
					m, _ := grpc.Method(ss.Context())
					return ss.SendMsg(bytesValue([]byte(m)))
				}),
				WithUnaryInterceptor(recUnaryServer(&l, "unary")),
				WithStreamInterceptor(func(s any, ss grpc.ServerStream, i *grpc.StreamServerInfo, h grpc.StreamHandler) error {
					l.add("stream>")
					mu.Lock()
					srv, info = s, *i
					mu.Unlock()
					return h(s, ss)
				}),
			}
			cc := s.dial(t, testServices(nil), serverOpts, nil)
			resp := new(wrapperspb.BytesValue)
			if err := cc.Invoke(context.Background(), method, bytesValue(nil), resp); err != nil {
				t.Fatal(err)
			}
			if string(resp.GetValue()) != method {
				t.Errorf("unknown handler answered %q", resp.GetValue())
			}
			if got := fmt.Sprint(l.take()); got != "[stream> unknown]" {
				t.Errorf("ran %s", got)
			}
			want := grpc.StreamServerInfo{FullMethod: method, IsClientStream: true, IsServerStream: true}
			mu.Lock()
			defer mu.Unlock()
			if info != want || srv != nil {
				t.Errorf("interceptor saw server %v, info %+v; want nil, %+v", srv, info, want)
			}
		})
	}
}
