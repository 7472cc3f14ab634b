package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// localEcho is a service the front server implements itself, with a
// method of every kind; each echoes the StringValues it receives with
// "local " in front, so that its answers cannot come from a backend.
var localEcho = grpc.ServiceDesc{
	ServiceName: "proxytest.Local",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Unary",
		Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			m := new(wrapperspb.StringValue)
			if err := dec(m); err != nil {
				return nil, err
			}
			return wrapperspb.String("local " + m.GetValue()), nil
		},
	}},
	Streams: []grpc.StreamDesc{
		{StreamName: "ClientStream", ClientStreams: true, Handler: localEchoStream},
		{StreamName: "ServerStream", ServerStreams: true, Handler: localEchoStream},
		{StreamName: "BidiStream", ClientStreams: true, ServerStreams: true, Handler: localEchoStream},
	},
}

// localEchoStream answers every request of a stream, then ends.
func localEchoStream(_ any, ss grpc.ServerStream) error {
	for {
		m := new(wrapperspb.StringValue)
		if err := ss.RecvMsg(m); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return err
		}
		if err := ss.SendMsg(wrapperspb.String("local " + m.GetValue())); err != nil {
			return err
		}
	}
}

// callLocal makes a call of every kind to localEcho through conn.
func callLocal(ctx context.Context, t *testing.T, conn grpc.ClientConnInterface) {
	t.Helper()
	got := new(wrapperspb.StringValue)
	if err := conn.Invoke(ctx, "/proxytest.Local/Unary", wrapperspb.String("u"), got); err != nil || got.GetValue() != "local u" {
		t.Fatalf("local Unary = %q, %v", got.GetValue(), err)
	}
	for _, sd := range localEcho.Streams {
		cs, err := conn.NewStream(ctx, &sd, "/proxytest.Local/"+sd.StreamName)
		if err != nil {
			t.Fatal(err)
		}
		if err := cs.SendMsg(wrapperspb.String(sd.StreamName)); err != nil {
			t.Fatal(err)
		}
		if err := cs.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if err := cs.RecvMsg(got); err != nil || got.GetValue() != "local "+sd.StreamName {
			t.Fatalf("local %s = %q, %v", sd.StreamName, got.GetValue(), err)
		}
		if sd.ServerStreams {
			if err := cs.RecvMsg(got); !errors.Is(err, io.EOF) {
				t.Fatalf("local %s did not end: %v", sd.StreamName, err)
			}
		}
	}
}

// callProxied makes a call of every kind to TestService through conn, and
// checks the backend's answers.
func callProxied(ctx context.Context, t *testing.T, conn grpc.ClientConnInterface) {
	t.Helper()
	cli := grpchantesting.NewTestServiceClient(conn)
	if resp, err := cli.Unary(ctx, msg("unary")); err != nil || string(resp.GetPayload()) != "unary" {
		t.Fatalf("Unary = %q, %v", resp.GetPayload(), err)
	}

	cs, err := cli.ClientStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"c1", "c2"} {
		if err := cs.Send(msg(p)); err != nil {
			t.Fatal(err)
		}
	}
	if resp, err := cs.CloseAndRecv(); err != nil || string(resp.GetPayload()) != "c2" || resp.GetCount() != 2 {
		t.Fatalf("ClientStream = %v, %v", resp, err)
	}

	ss, err := cli.ServerStream(ctx, &grpchantesting.Message{Payload: []byte("s"), Count: 3})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		m, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil || string(m.GetPayload()) != "s" {
			t.Fatalf("ServerStream message %d = %v, %v", n, m, err)
		}
		n++
	}
	if n != 3 {
		t.Fatalf("ServerStream sent %d messages, want 3", n)
	}

	bs, err := cli.BidiStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"b1", "b2"} {
		if err := bs.Send(msg(p)); err != nil {
			t.Fatal(err)
		}
		if m, err := bs.Recv(); err != nil || string(m.GetPayload()) != p {
			t.Fatalf("BidiStream echo of %s = %v, %v", p, m, err)
		}
	}
	if err := bs.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := bs.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("BidiStream did not end: %v", err)
	}
}

// proxiedMethods are the TestService methods the front server forwards;
// UseExternalMessageTwice is left out, so the front must not forward it.
var proxiedMethods = []string{"Unary", "ClientStream", "ServerStream", "BidiStream"}

// TestRegisterService: the front server forwards the listed methods of
// TestService and answers its own service itself, whatever its codec.
func TestRegisterService(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []grpc.ServerOption
	}{
		{"default codec", nil},
		{"proxy codec", []grpc.ServerOption{grpc.ForceServerCodecV2(proxy.Codec())}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder()
			backend := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, rec) })
			front := serve(t, func(s *grpc.Server) {
				s.RegisterService(&localEcho, struct{}{})
				proxy.RegisterService(s, to(backend), "grpchantesting.TestService", proxiedMethods...)
			}, tc.opts...)
			ctx := context.Background()

			callProxied(ctx, t, front)
			want := []string{"unary", "c1", "c2", "s", "b1", "b2"}
			if got := rec.payloads(); !slices.Equal(got, want) {
				t.Errorf("backend received %q, want %q", got, want)
			}
			callLocal(ctx, t, front)

			// A message too large for gRPC's small-message path goes
			// through unchanged as well.
			big := bytes.Repeat([]byte("0123456789"), 100_000)
			resp, err := grpchantesting.NewTestServiceClient(front).Unary(ctx, &grpchantesting.Message{Payload: big})
			if err != nil || !bytes.Equal(resp.GetPayload(), big) {
				t.Fatalf("large Unary: %d bytes back, %v", len(resp.GetPayload()), err)
			}
			want = append(want, string(big))

			_, err = grpchantesting.NewTestServiceClient(front).UseExternalMessageTwice(ctx, &emptypb.Empty{})
			if status.Code(err) != codes.Unimplemented {
				t.Errorf("unlisted method: %v, want Unimplemented", err)
			}
			if got := rec.payloads(); len(got) != len(want) {
				t.Errorf("backend received %q after the unlisted method", got)
			}
		})
	}
}

// TestRegisterServiceFanOut: a registered method fans out as any other,
// its results labelled with their backends.
func TestRegisterServiceFanOut(t *testing.T) {
	recA, recB := newRecorder(), newRecorder()
	a := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recA) })
	b := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, recB) })
	front := serve(t, func(s *grpc.Server) {
		s.RegisterService(&localEcho, struct{}{})
		proxy.RegisterService(s, fanTo(proxy.Backend{Name: "a", Conn: a}, proxy.Backend{Name: "b", Conn: b}), "grpchantesting.TestService", "Unary")
	})
	results, err := fanCall(context.Background(), t, front, "/grpchantesting.TestService/Unary", proxy.DefaultLabelField, msg("x"))
	if err != nil {
		t.Fatal(err)
	}
	got := byBackend(results)
	if len(got) != 2 || !slices.Equal(got["a"], []string{"x"}) || !slices.Equal(got["b"], []string{"x"}) {
		t.Fatalf("results by backend: %q", got)
	}
}

// TestRegisterServiceOnTunnelServer: ServiceDesc registers on any
// grpc.ServiceRegistrar, here the server end of a forward tunnel.
func TestRegisterServiceOnTunnelServer(t *testing.T) {
	rec := newRecorder()
	backend := serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, rec) })
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{})
	handler.RegisterService(proxy.ServiceDesc(to(backend), "grpchantesting.TestService", proxiedMethods), struct{}{})
	conn := serve(t, func(s *grpc.Server) { tunnelpb.RegisterTunnelServiceServer(s, handler.Service()) })
	ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	callProxied(context.Background(), t, ch)
	if got := rec.payloads(); len(got) != 6 {
		t.Fatalf("backend received %q", got)
	}
}

func TestRegisterServiceNoMethods(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("RegisterService with no methods did not panic")
		}
	}()
	proxy.RegisterService(grpc.NewServer(), to(nil), "some.Service")
}
