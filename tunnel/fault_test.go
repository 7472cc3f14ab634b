package tunnel

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// cutter is a TCP proxy whose connections a test can cut at once, as when a
// network fails under a tunnel.
type cutter struct {
	lis    net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func startCutter(t *testing.T, target string) *cutter {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{lis: lis, target: target}
	c.wg.Go(c.accept)
	t.Cleanup(func() {
		_ = lis.Close()
		c.cut()
		c.wg.Wait()
	})
	return c
}

func (c *cutter) accept() {
	for {
		in, err := c.lis.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", c.target)
		if err != nil {
			_ = in.Close()
			continue
		}
		c.mu.Lock()
		c.conns = append(c.conns, in, out)
		c.mu.Unlock()
		c.wg.Go(func() { _, _ = io.Copy(out, in); _ = out.Close() })
		c.wg.Go(func() { _, _ = io.Copy(in, out); _ = in.Close() })
	}
}

// cut closes every connection through the proxy.
func (c *cutter) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, conn := range c.conns {
		_ = conn.Close()
	}
	c.conns = nil
}

// TestConnectionDiesUnderTunnels cuts the TCP connections under a forward
// and a reverse tunnel while a call is in progress on each: the callers get
// Unavailable, the handlers' contexts end, and the handler forgets both
// tunnels.
func TestConnectionDiesUnderTunnels(t *testing.T) {
	handlerDone := make(chan struct{}, 2)
	held := &probe{stream: func(ss grpc.ServerStream) error {
		if err := ss.SendHeader(nil); err != nil {
			return err
		}
		<-ss.Context().Done()
		handlerDone <- struct{}{}
		return ss.Context().Err()
	}}
	var closed sync.WaitGroup
	closed.Add(1)
	ts := startServer(t, TunnelServiceHandlerOptions{OnReverseTunnelClose: func(TunnelChannel) { closed.Done() }}, testServices(held))
	proxy := startCutter(t, ts.conn.Target())
	conn, err := grpc.NewClient(proxy.lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stub := tunnelpb.NewTunnelServiceClient(conn)

	fwd := forward(t, stub)
	rs := NewReverseTunnelServer(stub)
	testServices(held)(rs)
	served := make(chan error, 1)
	go func() {
		_, err := rs.Serve(context.Background())
		served <- err
	}()
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 1 })

	var calls []grpc.ClientStream
	for _, cc := range []grpc.ClientConnInterface{fwd, ts.handler.AsChannel()} {
		cs, err := openHeld(context.Background(), cc)
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, cs)
	}

	proxy.cut()

	for i, cs := range calls {
		if err := cs.RecvMsg(new(struct{})); status.Code(err) != codes.Unavailable {
			t.Fatalf("call %d ended with %v; want Unavailable", i, err)
		}
	}
	<-handlerDone
	<-handlerDone
	closed.Wait()
	<-fwd.Done()
	if fwd.Err() == nil {
		t.Fatal("a forward tunnel whose connection died reports no error")
	}
	if err := <-served; err == nil {
		t.Fatal("Serve returned no error for a connection that died")
	}
	waitFor(t, func() bool {
		n := 0
		ts.handler.forwardTunnels.Range(func(any, any) bool { n++; return true })
		return n == 0 && len(ts.handler.AllReverseTunnels()) == 0
	})
}
