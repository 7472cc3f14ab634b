package tunnel

import (
	"context"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The benchmarks measure a tunneled call against the same call made directly
// on the gRPC connection that carries the tunnel, so the ratio between them
// is the tunnel's cost.

func benchTargets(b *testing.B) map[string]grpc.ClientConnInterface {
	p := &probe{}
	ts := startServerWith(b, TunnelServiceHandlerOptions{}, testServices(p), testServices(p))
	rev := startServer(b, TunnelServiceHandlerOptions{}, nil)
	reverse(b, rev.handler, rev.stub, 1, testServices(p))
	return map[string]grpc.ClientConnInterface{
		"direct":  ts.conn,
		"forward": forward(b, ts.stub),
		"reverse": rev.handler.AsChannel(),
	}
}

func BenchmarkUnary(b *testing.B) {
	for _, name := range []string{"direct", "forward", "reverse"} {
		b.Run(name, func(b *testing.B) {
			cc := benchTargets(b)[name]
			req := bytesValue(make([]byte, 64))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if err := cc.Invoke(context.Background(), probeUnary, req, new(wrapperspb.BytesValue)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkEcho1MiB sends 1 MiB messages through an echoing stream, so each
// byte crosses the tunnel twice.
func BenchmarkEcho1MiB(b *testing.B) {
	for _, name := range []string{"direct", "forward", "reverse"} {
		b.Run(name, func(b *testing.B) {
			cc := benchTargets(b)[name]
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
			if err != nil {
				b.Fatal(err)
			}
			msg := bytesValue(make([]byte, 1<<20))
			errc := make(chan error, 1)
			go func() {
				for range b.N {
					if err := cs.SendMsg(msg); err != nil {
						errc <- err
						return
					}
				}
				errc <- cs.CloseSend()
			}()
			b.SetBytes(1 << 20)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if err := <-errc; err != nil {
				b.Fatal(err)
			}
		})
	}
}
