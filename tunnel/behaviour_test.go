package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// eachTransport runs fn over every topology with the given services.
func eachTransport(t *testing.T, p *probe, fn func(t *testing.T, cc grpc.ClientConnInterface), opts ...TunnelOption) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			fn(t, tr.dial(t, testServices(p), opts))
		})
	}
}

func unary(ctx context.Context, cc grpc.ClientConnInterface, in []byte, opts ...grpc.CallOption) ([]byte, error) {
	out := new(wrapperspb.BytesValue)
	err := cc.Invoke(ctx, probeUnary, bytesValue(in), out, opts...)
	return out.GetValue(), err
}

func wantCode(t testing.TB, err error, code codes.Code) {
	t.Helper()
	if got := status.Code(err); got != code {
		t.Fatalf("got status %v (%v); want %v", got, err, code)
	}
}

func TestDeadlineReachesHandler(t *testing.T) {
	p := &probe{unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		dl, ok := ctx.Deadline()
		if !ok {
			return nil, status.Error(codes.FailedPrecondition, "no deadline")
		}
		return bytesValue([]byte(time.Until(dl).String())), nil
	}}
	eachTransport(t, p, func(t *testing.T, cc grpc.ClientConnInterface) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := unary(ctx, cc, nil)
		if err != nil {
			t.Fatal(err)
		}
		left, err := time.ParseDuration(string(out))
		if err != nil || left <= 0 || left > time.Minute {
			t.Fatalf("handler saw %q left of a one-minute deadline", out)
		}
	})
}

// TestCancellationEndsBothSides cancels from the caller and from the
// handler and checks that each end sees it.
func TestCancellationEndsBothSides(t *testing.T) {
	handlerErr := make(chan error, 1)
	p := &probe{stream: func(ss grpc.ServerStream) error {
		in := new(wrapperspb.BytesValue)
		if err := ss.RecvMsg(in); err != nil {
			return err
		}
		if string(in.GetValue()) == "fail" {
			return status.Error(codes.Aborted, "handler gave up")
		}
		if err := ss.SendHeader(metadata.Pairs("started", "yes")); err != nil {
			return err
		}
		<-ss.Context().Done()
		handlerErr <- ss.Context().Err()
		return ss.Context().Err()
	}}
	eachTransport(t, p, func(t *testing.T, cc grpc.ClientConnInterface) {
		t.Run("caller cancels", func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
			if err != nil {
				t.Fatal(err)
			}
			if err := cs.SendMsg(bytesValue([]byte("wait"))); err != nil {
				t.Fatal(err)
			}
			if _, err := cs.Header(); err != nil {
				t.Fatal(err)
			}
			cancel()
			wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Canceled)
			if err := <-handlerErr; !errors.Is(err, context.Canceled) {
				t.Fatalf("handler saw %v; want context.Canceled", err)
			}
		})
		t.Run("handler ends", func(t *testing.T) {
			cs, err := cc.NewStream(context.Background(), probeStreamDesc, probeStream)
			if err != nil {
				t.Fatal(err)
			}
			if err := cs.SendMsg(bytesValue([]byte("fail"))); err != nil {
				t.Fatal(err)
			}
			wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Aborted)
			// Sending on an ended call reports io.EOF, as in gRPC.
			waitFor(t, func() bool { return errors.Is(cs.SendMsg(bytesValue(nil)), io.EOF) })
		})
	})
}

func TestTrailersOnlyResponse(t *testing.T) {
	p := &probe{unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		_ = grpc.SetTrailer(ctx, metadata.Pairs("why", "because"))
		st, _ := status.New(codes.PermissionDenied, "no").WithDetails(wrapperspb.String("detail"))
		return nil, st.Err()
	}}
	eachTransport(t, p, func(t *testing.T, cc grpc.ClientConnInterface) {
		var hdr, tlr metadata.MD
		_, err := unary(context.Background(), cc, nil, grpc.Header(&hdr), grpc.Trailer(&tlr))
		wantCode(t, err, codes.PermissionDenied)
		if d := status.Convert(err).Details(); len(d) != 1 || !proto.Equal(d[0].(proto.Message), wrapperspb.String("detail")) {
			t.Fatalf("details %v", d)
		}
		if len(hdr) != 0 {
			t.Fatalf("trailers-only response has headers %v", hdr)
		}
		if got := tlr.Get("why"); len(got) != 1 || got[0] != "because" {
			t.Fatalf("trailer %v", tlr)
		}
	})
}

// echoMetadata answers with the request's "x-bin" value and sends it back
// as a header and a trailer too.
var echoMetadata = &probe{unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get("x-bin")
	if len(v) != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "x-bin: %q", v)
	}
	if err := grpc.SetHeader(ctx, metadata.Pairs("x-bin", v[0])); err != nil {
		return nil, err
	}
	if err := grpc.SetTrailer(ctx, metadata.Pairs("x-bin", v[0])); err != nil {
		return nil, err
	}
	return bytesValue([]byte(v[0])), nil
}}

func TestBinaryMetadataRoundTrips(t *testing.T) {
	raw := string([]byte{0xff, 0x00, 0xfe, 0x80, 'a'}) // not UTF-8
	eachTransport(t, echoMetadata, func(t *testing.T, cc grpc.ClientConnInterface) {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "x-bin", raw)
		var hdr, tlr metadata.MD
		out, err := unary(ctx, cc, nil, grpc.Header(&hdr), grpc.Trailer(&tlr))
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != raw || hdr.Get("x-bin")[0] != raw || tlr.Get("x-bin")[0] != raw {
			t.Fatalf("binary metadata changed: body %q header %q trailer %q", out, hdr.Get("x-bin"), tlr.Get("x-bin"))
		}
	})
}

func TestBinaryMetadataWithPlainPeer(t *testing.T) {
	for _, side := range []string{"plain server", "plain client"} {
		t.Run(side, func(t *testing.T) {
			var srvOpts, cliOpts []TunnelOption
			if side == "plain server" {
				srvOpts = []TunnelOption{WithPlainProtocol()}
			} else {
				cliOpts = []TunnelOption{WithPlainProtocol()}
			}
			ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: srvOpts}, testServices(echoMetadata))
			cc := forward(t, ts.stub, cliOpts...)
			// Valid UTF-8 in a -bin value still works with a plain peer.
			ctx := metadata.AppendToOutgoingContext(context.Background(), "x-bin", "text")
			if out, err := unary(ctx, cc, nil); err != nil || string(out) != "text" {
				t.Fatalf("got %q, %v", out, err)
			}
			// Arbitrary bytes cannot travel; the call fails clearly and the
			// tunnel stays usable.
			ctx = metadata.AppendToOutgoingContext(context.Background(), "x-bin", "\xff")
			_, err := unary(ctx, cc, nil)
			wantCode(t, err, codes.Internal)
			if !bytes.Contains([]byte(status.Convert(err).Message()), []byte("UTF-8")) {
				t.Fatalf("unclear error: %v", err)
			}
			if _, err := unary(context.Background(), cc, nil, grpc.WaitForReady(false)); status.Code(err) != codes.InvalidArgument {
				t.Fatalf("tunnel unusable after a refused call: %v", err)
			}
		})
	}
}

func TestReservedHeadersAreNotForwarded(t *testing.T) {
	p := &probe{unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		for _, k := range []string{"grpc-timeout", "content-type", "user-agent"} {
			if v := md.Get(k); len(v) > 0 {
				return nil, status.Errorf(codes.FailedPrecondition, "handler saw %s: %v", k, v)
			}
		}
		if _, ok := ctx.Deadline(); ok {
			return nil, status.Error(codes.FailedPrecondition, "a caller's grpc-timeout header set a deadline")
		}
		return bytesValue([]byte(md.Get("ok")[0])), nil
	}}
	eachTransport(t, p, func(t *testing.T, cc grpc.ClientConnInterface) {
		ctx := metadata.AppendToOutgoingContext(context.Background(),
			"grpc-timeout", "1n", "content-type", "application/grpc+json", "ok", "yes")
		out, err := unary(ctx, cc, nil)
		if err != nil || string(out) != "yes" {
			t.Fatalf("got %q, %v", out, err)
		}
	})
}

type staticCreds struct {
	secure bool
}

func (c staticCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer t0ken"}, nil
}
func (c staticCreds) RequireTransportSecurity() bool { return c.secure }

func TestCallOptions(t *testing.T) {
	p := &probe{unary: func(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		_ = grpc.SetHeader(ctx, metadata.Pairs("h", "1"))
		_ = grpc.SetTrailer(ctx, metadata.Pairs("t", "2"))
		if n, err := strconv.Atoi(string(in.GetValue())); err == nil {
			return bytesValue(make([]byte, n)), nil
		}
		return bytesValue([]byte(fmt.Sprint(md.Get("authorization")))), nil
	}}
	eachTransport(t, p, func(t *testing.T, cc grpc.ClientConnInterface) {
		ctx := context.Background()
		t.Run("header trailer peer", func(t *testing.T) {
			var hdr, tlr metadata.MD
			var pr peer.Peer
			if _, err := unary(ctx, cc, nil, grpc.Header(&hdr), grpc.Trailer(&tlr), grpc.Peer(&pr)); err != nil {
				t.Fatal(err)
			}
			if hdr.Get("h")[0] != "1" || tlr.Get("t")[0] != "2" {
				t.Fatalf("header %v trailer %v", hdr, tlr)
			}
			if pr.Addr == nil {
				t.Fatal("grpc.Peer left empty")
			}
		})
		t.Run("per-RPC credentials", func(t *testing.T) {
			out, err := unary(ctx, cc, nil, grpc.PerRPCCredentials(staticCreds{}))
			if err != nil || string(out) != "[Bearer t0ken]" {
				t.Fatalf("got %q, %v", out, err)
			}
			// The tunnel runs over plaintext, so credentials that need a
			// secure transport are refused before anything is sent.
			_, err = unary(ctx, cc, nil, grpc.PerRPCCredentials(staticCreds{secure: true}))
			wantCode(t, err, codes.Unauthenticated)
		})
		t.Run("message size limits", func(t *testing.T) {
			if _, err := unary(ctx, cc, []byte("1000"), grpc.MaxCallRecvMsgSize(2000)); err != nil {
				t.Fatal(err)
			}
			_, err := unary(ctx, cc, []byte("1000"), grpc.MaxCallRecvMsgSize(100))
			wantCode(t, err, codes.ResourceExhausted)
			_, err = unary(ctx, cc, make([]byte, 200), grpc.MaxCallSendMsgSize(100))
			wantCode(t, err, codes.ResourceExhausted)
		})
		t.Run("forced raw codec", func(t *testing.T) {
			req, _ := proto.Marshal(bytesValue([]byte("1000")))
			var resp []byte
			err := cc.Invoke(ctx, probeUnary, &req, &resp, grpc.ForceCodecV2(rawCodecV2{}))
			if err != nil {
				t.Fatal(err)
			}
			var got wrapperspb.BytesValue
			if err := proto.Unmarshal(resp, &got); err != nil || len(got.GetValue()) != 1000 {
				t.Fatalf("raw response %d bytes: %v", len(resp), err)
			}
			var resp1 []byte
			if err := cc.Invoke(ctx, probeUnary, &req, &resp1, grpc.ForceCodec(rawCodec{})); err != nil || !bytes.Equal(resp, resp1) {
				t.Fatalf("legacy codec: %v", err)
			}
		})
	})
}

func TestInterceptors(t *testing.T) {
	var serverSaw, clientSaw []string
	p := &probe{unary: func(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		return in, nil
	}}
	reg := func(r grpc.ServiceRegistrar) {
		r = grpchan.WithInterceptor(r,
			func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				serverSaw = append(serverSaw, info.FullMethod)
				return h(ctx, req)
			}, nil)
		r.RegisterService(&probeDesc, p)
	}
	ts := startServer(t, TunnelServiceHandlerOptions{}, reg)
	cc := grpchan.InterceptClientConn(forward(t, ts.stub),
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			clientSaw = append(clientSaw, method)
			return invoker(ctx, method, req, reply, cc, opts...)
		}, nil)
	if _, err := unary(context.Background(), cc, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(serverSaw) != "["+probeUnary+"]" || fmt.Sprint(clientSaw) != "["+probeUnary+"]" {
		t.Fatalf("server interceptor saw %v, client interceptor saw %v", serverSaw, clientSaw)
	}
}

func TestTunnelMetadata(t *testing.T) {
	p := &probe{unary: func(ctx context.Context, _ *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
		md, ok := TunnelMetadataFromIncomingContext(ctx)
		if !ok {
			return nil, status.Error(codes.FailedPrecondition, "no tunnel metadata")
		}
		return bytesValue([]byte(fmt.Sprint(md.Get("tunnel-auth")))), nil
	}}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "tunnel-auth", "secret")
	p.stream = func(grpc.ServerStream) error { return nil }
	t.Run("forward", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(p))
		ch, err := NewChannel(ts.stub).Start(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		out, err := unary(context.Background(), ch, nil)
		if err != nil || string(out) != "[secret]" {
			t.Fatalf("got %q, %v", out, err)
		}
		cs, err := ch.NewStream(context.Background(), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		md, ok := TunnelMetadataFromOutgoingContext(cs.Context())
		if !ok || md.Get("tunnel-auth")[0] != "secret" {
			t.Fatalf("outgoing tunnel metadata %v, %v", md, ok)
		}
		if TunnelChannelFromContext(cs.Context()) != ch {
			t.Fatal("TunnelChannelFromContext does not name the tunnel")
		}
		_ = cs.CloseSend()
	})
	t.Run("reverse", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
		reverseCtx(t, ctx, ts.handler, ts.stub, 1, testServices(p))
		out, err := unary(context.Background(), ts.handler.AsChannel(), nil)
		if err != nil || string(out) != "[secret]" {
			t.Fatalf("got %q, %v", out, err)
		}
	})
}

// rawCodec passes *[]byte through untouched.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

// rawCodecV2 is rawCodec on buffer slices.
type rawCodecV2 struct{}

func (rawCodecV2) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}
func (rawCodecV2) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}
func (rawCodecV2) Name() string { return "raw" }
