package tunnel

import (
	"context"
	"fmt"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The benchmarks measure a tunneled call against the same call made directly
// on the gRPC connection that carries the tunnel, so the ratio between them
// is the tunnel's cost.

func benchTargets(b *testing.B) map[string]grpc.ClientConnInterface {
	p := producer
	// Servers that accept tunnels with the frame codec, as Codec's doc
	// tells them to.
	codec := grpc.ForceServerCodecV2(Codec())
	ts := startServerWith(b, TunnelServiceHandlerOptions{}, testServices(p), testServices(p), codec)
	rev := startServerWith(b, TunnelServiceHandlerOptions{}, nil, nil, codec)
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

// BenchmarkDownload streams messages of 1 KiB (per-message costs) and 1 MiB
// (per-byte costs) from handler to caller only.
func BenchmarkDownload(b *testing.B) {
	for _, size := range []uint64{1 << 10, 1 << 20} {
		for _, name := range []string{"direct", "forward", "reverse"} {
			b.Run(fmt.Sprintf("%dKiB/%s", size>>10, name), func(b *testing.B) {
				cc := benchTargets(b)[name]
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				cs, err := produce(ctx, cc, 1<<62, size)
				if err != nil {
					b.Fatal(err)
				}
				b.SetBytes(int64(size))
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
}
