package proxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/proxy"
)

// backendAddr serves a recorder on loopback and returns its address.
func backendAddr(t *testing.T) (string, *recorder) {
	t.Helper()
	rec := newRecorder()
	srv := grpc.NewServer()
	grpchantesting.RegisterTestServiceServer(srv, rec)
	return loopback.ServeAddr(t, srv), rec
}

// countDials is a dialer that counts the connections it makes.
func countDials(n *atomic.Int32) grpc.DialOption {
	return grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		n.Add(1)
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	})
}

// newCache returns a cache that is closed at cleanup.
func newCache(t *testing.T, opts ...proxy.ConnCacheOption) *proxy.ConnCache {
	t.Helper()
	c := proxy.NewConnCache(opts...)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func unary(t *testing.T, conn grpc.ClientConnInterface, payload string) {
	t.Helper()
	resp, err := grpchantesting.NewTestServiceClient(conn).Unary(context.Background(), msg(payload))
	if err != nil || string(resp.GetPayload()) != payload {
		t.Fatalf("Unary(%s) = %q, %v", payload, resp.GetPayload(), err)
	}
}

// waitFor polls cond until it holds, failing the test if it does not
// within a generous bound: for what happens on another goroutine.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func isShutdown(conn grpc.ClientConnInterface) bool {
	return proxy.Underlying(conn).GetState() == connectivity.Shutdown
}

// TestConnCacheDialsOnce: callers asking for one address at once share
// one connection, and keep using it.
func TestConnCacheDialsOnce(t *testing.T) {
	addr, rec := backendAddr(t)
	var dials atomic.Int32
	cache := newCache(t, proxy.CacheDialOptions(countDials(&dials)))

	const n = 32
	conns := make([]grpc.ClientConnInterface, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			conn, err := cache.Get(addr)
			if err != nil {
				t.Error(err)
				return
			}
			conns[i] = conn
			if _, err := grpchantesting.NewTestServiceClient(conn).Unary(context.Background(), msg("x")); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	for i := range conns {
		if conns[i] != conns[0] {
			t.Fatalf("Get %d returned another connection", i)
		}
	}
	again, err := cache.Get(addr)
	if err != nil || again != conns[0] {
		t.Fatalf("a later Get = %v, %v; want the same connection", again, err)
	}
	unary(t, again, "y")
	if d := dials.Load(); d != 1 {
		t.Errorf("%d dials, want 1", d)
	}
	if got := len(rec.payloads()); got != n+1 {
		t.Errorf("backend got %d calls, want %d", got, n+1)
	}
	if a := proxy.Active(again); a != 0 {
		t.Errorf("%d calls in progress after all ended", a)
	}

	// Another address gets a connection of its own.
	other, _ := backendAddr(t)
	oc, err := cache.Get(other)
	if err != nil || oc == again {
		t.Fatalf("Get(other) = %v, %v", oc, err)
	}
	unary(t, oc, "z")
}

// TestConnCacheIdle: a connection no call uses for the idle timeout is
// closed, one with a call in progress is not, and a call on a closed one
// dials again.
func TestConnCacheIdle(t *testing.T) {
	addr, _ := backendAddr(t)
	clock := proxy.NewFakeClock()
	var dials atomic.Int32
	cache := newCache(t, proxy.CacheClock(clock), proxy.CacheIdleTimeout(time.Minute), proxy.CacheDialOptions(countDials(&dials)))

	conn, err := cache.Get(addr)
	if err != nil {
		t.Fatal(err)
	}
	unary(t, conn, "a")
	clock.Advance(59 * time.Second)
	if isShutdown(conn) {
		t.Fatal("closed before the idle timeout")
	}
	clock.Advance(time.Second)
	if !isShutdown(conn) {
		t.Fatal("not closed after the idle timeout")
	}
	if clock.Pending() != 0 {
		t.Errorf("%d timers left with no connection", clock.Pending())
	}

	// The old value still works: it dials again.
	unary(t, conn, "b")
	if d := dials.Load(); d != 2 {
		t.Errorf("%d dials, want 2", d)
	}
	fresh, err := cache.Get(addr)
	if err != nil || fresh == conn || isShutdown(fresh) {
		t.Fatalf("Get after idle = %v, %v; want a new open connection", fresh, err)
	}

	// A stream in progress keeps the connection however long it lasts.
	stream, err := grpchantesting.NewTestServiceClient(fresh).BidiStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Hour)
	if isShutdown(fresh) {
		t.Fatal("closed with a stream in progress")
	}
	if err := stream.Send(msg("c")); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	if a := proxy.Active(fresh); a != 0 {
		t.Fatalf("%d calls in progress after the stream ended", a)
	}
	// Idle from the stream's end, not from before it.
	clock.Advance(30 * time.Second)
	if isShutdown(fresh) {
		t.Fatal("closed sooner than the idle timeout after the stream ended")
	}
	clock.Advance(30 * time.Second)
	if !isShutdown(fresh) {
		t.Fatal("not closed once idle after the stream")
	}
}

// TestConnCacheCallsEnd: every way a call can end counts it as ended.
func TestConnCacheCallsEnd(t *testing.T) {
	addr, _ := backendAddr(t)
	cache := newCache(t)
	conn, err := cache.Get(addr)
	if err != nil {
		t.Fatal(err)
	}
	cli := grpchantesting.NewTestServiceClient(conn)
	ctx := context.Background()

	t.Run("client stream", func(t *testing.T) {
		// Without server streaming, the one response ends the call.
		cs, err := cli.ClientStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if proxy.Active(conn) != 1 {
			t.Fatal("stream not counted")
		}
		_ = cs.Send(msg("x"))
		if _, err := cs.CloseAndRecv(); err != nil {
			t.Fatal(err)
		}
		if a := proxy.Active(conn); a != 0 {
			t.Fatalf("%d calls in progress", a)
		}
	})
	t.Run("error", func(t *testing.T) {
		desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
		cs, err := conn.NewStream(ctx, desc, "/no.Such/Method")
		if err != nil {
			t.Fatal(err)
		}
		_ = cs.CloseSend()
		if err := cs.RecvMsg(new(grpchantesting.Message)); status.Code(err) != codes.Unimplemented {
			t.Fatalf("unknown method: %v", err)
		}
		if a := proxy.Active(conn); a != 0 {
			t.Fatalf("%d calls in progress", a)
		}
		// So does a unary call's.
		if err := conn.Invoke(ctx, "/no.Such/Method", msg("x"), new(grpchantesting.Message)); status.Code(err) != codes.Unimplemented {
			t.Fatalf("unknown method: %v", err)
		}
		if a := proxy.Active(conn); a != 0 {
			t.Fatalf("%d calls in progress", a)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		if _, err := cli.BidiStream(cctx); err != nil {
			t.Fatal(err)
		}
		if proxy.Active(conn) != 1 {
			t.Fatal("stream not counted")
		}
		// Abandoned without reading: the cancellation ends it.
		cancel()
		waitFor(t, "the cancelled stream to end", func() bool { return proxy.Active(conn) == 0 })
	})
}

// TestConnCacheRemove: Remove closes the connection; calls through it
// fail, and the next Get dials again.
func TestConnCacheRemove(t *testing.T) {
	addr, _ := backendAddr(t)
	var dials atomic.Int32
	cache := newCache(t, proxy.CacheDialOptions(countDials(&dials)))
	conn, err := cache.Get(addr)
	if err != nil {
		t.Fatal(err)
	}
	unary(t, conn, "a")
	cache.Remove(addr)
	if !isShutdown(conn) {
		t.Fatal("Remove did not close the connection")
	}
	_, err = grpchantesting.NewTestServiceClient(conn).Unary(context.Background(), msg("b"))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("a call on a removed connection: %v, want Unavailable", err)
	}
	cache.Remove(addr)        // twice is harmless
	cache.Remove("elsewhere") // as is an address never used

	fresh, err := cache.Get(addr)
	if err != nil || fresh == conn {
		t.Fatalf("Get after Remove = %v, %v; want a new connection", fresh, err)
	}
	unary(t, fresh, "c")
	if d := dials.Load(); d != 2 {
		t.Errorf("%d dials, want 2", d)
	}
}

// TestConnCacheClose: Close closes every connection, and the cache fails
// clearly from then on.
func TestConnCacheClose(t *testing.T) {
	a, _ := backendAddr(t)
	b, _ := backendAddr(t)
	cache := proxy.NewConnCache()
	ca, err := cache.Get(a)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := cache.Get(b)
	if err != nil {
		t.Fatal(err)
	}
	unary(t, ca, "a")
	if err := cache.Close(); err != nil {
		t.Fatal(err)
	}
	if !isShutdown(ca) || !isShutdown(cb) {
		t.Fatal("Close left a connection open")
	}
	if _, err := cache.Get(a); !errors.Is(err, proxy.ErrConnCacheClosed) {
		t.Fatalf("Get after Close: %v, want ErrConnCacheClosed", err)
	}
	_, err = grpchantesting.NewTestServiceClient(ca).Unary(context.Background(), msg("b"))
	if !errors.Is(err, proxy.ErrConnCacheClosed) || status.Code(err) != codes.Unavailable {
		t.Fatalf("a call after Close: %v, want ErrConnCacheClosed", err)
	}
	if err := cache.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestConnCacheBehindProxy: the cache as a director uses it, routing each
// call by an address in its metadata, with every kind of call.
func TestConnCacheBehindProxy(t *testing.T) {
	addrA, recA := backendAddr(t)
	addrB, recB := backendAddr(t)
	cache := newCache(t)
	director := func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		addr := md.Get("backend-addr")
		if len(addr) != 1 {
			return proxy.Route{}, status.Error(codes.InvalidArgument, "want one backend-addr")
		}
		conn, err := cache.Get(addr[0])
		if err != nil {
			return proxy.Route{}, err
		}
		return proxy.To(conn, md.Copy()), nil
	}
	front := serve(t, nil, proxy.ServerOptions(director)...)
	ctxA := metadata.AppendToOutgoingContext(context.Background(), "backend-addr", addrA)
	ctxB := metadata.AppendToOutgoingContext(context.Background(), "backend-addr", addrB)
	callProxied(ctxA, t, front)
	callProxied(ctxB, t, front)
	if len(recA.payloads()) != 6 || len(recB.payloads()) != 6 {
		t.Fatalf("backends received %q and %q", recA.payloads(), recB.payloads())
	}
	for _, addr := range []string{addrA, addrB} {
		conn, _ := cache.Get(addr)
		waitFor(t, "the proxied calls to end", func() bool { return proxy.Active(conn) == 0 })
	}
}
