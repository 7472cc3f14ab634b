package proxy_test

import (
	"context"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// benchFanOut measures a server-streaming call of 100 messages fanned out
// to two backends, the messages read raw.
func benchFanOut(b *testing.B, opts ...proxy.Option) {
	backend := func() grpc.ClientConnInterface {
		conn, stop := listen(func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, &grpchantesting.TestServer{}) })
		b.Cleanup(stop)
		return conn
	}
	director := fanTo(proxy.Backend{Name: "a", Conn: backend()}, proxy.Backend{Name: "b", Conn: backend()})
	front, stop := listen(nil, proxy.ServerOptions(director, opts...)...)
	b.Cleanup(stop)
	req := &grpchantesting.Message{Payload: make([]byte, 1024), Count: 100}
	b.ReportAllocs()
	for b.Loop() {
		cs, err := front.NewStream(context.Background(), &grpc.StreamDesc{ServerStreams: true}, serverStreamMethod, grpc.ForceCodecV2(rawCodec{}))
		if err != nil {
			b.Fatal(err)
		}
		if err := cs.SendMsg(req); err != nil {
			b.Fatal(err)
		}
		_ = cs.CloseSend()
		n := 0
		for {
			var raw []byte
			if err := cs.RecvMsg(&raw); err != nil {
				break
			}
			n++
		}
		if n != 200 {
			b.Fatalf("%d messages; want 200", n)
		}
	}
}

// BenchmarkFanOut compares the default labels, which add no allocation per
// message, with a Responder that passes messages unchanged: the cost of the
// copy every Responder works on.
func BenchmarkFanOut(b *testing.B) {
	b.Run("labels", func(b *testing.B) { benchFanOut(b) })
	b.Run("responder", func(b *testing.B) { benchFanOut(b, proxy.WithResponder(&proxy.Responder{})) })
}
