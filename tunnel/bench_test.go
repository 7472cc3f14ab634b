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
	p := producer
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

// BenchmarkDownload1MiB streams 1 MiB messages from handler to caller only.
func BenchmarkDownload1MiB(b *testing.B) {
	for _, name := range []string{"direct", "forward", "reverse"} {
		b.Run(name, func(b *testing.B) {
			cc := benchTargets(b)[name]
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cs, err := produce(ctx, cc, 1<<62, 1<<20)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(1 << 20)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
