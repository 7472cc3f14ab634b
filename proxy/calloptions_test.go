package proxy_test

import (
	"context"
	"sync"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	_ "google.golang.org/grpc/encoding/gzip" // for grpc.UseCompressor("gzip")

	"github.com/grpctunnel/grpctunnel/proxy"
)

// optionsConn is a backend that records the call options of each call.
type optionsConn struct {
	grpc.ClientConnInterface
	mu   sync.Mutex
	seen [][]grpc.CallOption
}

func (c *optionsConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	c.mu.Lock()
	c.seen = append(c.seen, opts)
	c.mu.Unlock()
	return c.ClientConnInterface.NewStream(ctx, desc, method, opts...)
}

// check reports whether every call so far compressed with gzip and left
// the proxy's codec to apply last.
func (c *optionsConn) check(t *testing.T, name string) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.seen) == 0 {
		t.Fatalf("%s: no call reached the backend", name)
	}
	for _, opts := range c.seen {
		compressed := false
		for _, o := range opts {
			if o, ok := o.(grpc.CompressorCallOption); ok && o.CompressorType == "gzip" {
				compressed = true
			}
		}
		last, ok := opts[len(opts)-1].(grpc.ForceCodecV2CallOption)
		if !compressed || !ok || last.CodecV2 != proxy.Codec() {
			t.Errorf("%s: backend call options %#v; want gzip, and the proxy's codec last", name, opts)
		}
	}
}

func TestWithCallOptions(t *testing.T) {
	opts := proxy.WithCallOptions(grpc.UseCompressor("gzip"), grpc.ForceCodecV2(nil))
	t.Run("one backend", func(t *testing.T) {
		backend := &optionsConn{ClientConnInterface: serve(t, testService)}
		front := serve(t, nil, proxy.ServerOptions(to(backend), opts)...)
		grpchantesting.RunChannelTestCases(t, front, true)
		backend.check(t, "backend")
	})
	t.Run("fan-out", func(t *testing.T) {
		a := &optionsConn{ClientConnInterface: serve(t, testService)}
		b := &optionsConn{ClientConnInterface: serve(t, testService)}
		front := serve(t, nil, proxy.ServerOptions(fanTo(proxy.Backend{Name: "a", Conn: a}, proxy.Backend{Name: "b", Conn: b}), opts)...)
		if _, err := fanCall(context.Background(), t, front, unaryMethod, proxy.DefaultLabelField, msg("hello")); err != nil {
			t.Fatal(err)
		}
		a.check(t, "a")
		b.check(t, "b")
	})
}
