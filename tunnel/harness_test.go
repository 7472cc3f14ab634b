package tunnel

import (
	"context"
	"net"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// testServer is a real gRPC server on loopback with a TunnelServiceHandler.
type testServer struct {
	handler *TunnelServiceHandler
	server  *grpc.Server
	conn    *grpc.ClientConn
	stub    tunnelpb.TunnelServiceClient
}

// startServer starts a gRPC server with a tunnel handler and dials it. The
// handler serves grpchantesting's TestServer on forward tunnels.
func startServer(t testing.TB, opts TunnelServiceHandlerOptions) *testServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{handler: NewTunnelServiceHandler(opts), server: grpc.NewServer()}
	grpchantesting.RegisterTestServiceServer(ts.handler, &grpchantesting.TestServer{})
	tunnelpb.RegisterTunnelServiceServer(ts.server, ts.handler.Service())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = ts.server.Serve(lis)
	}()
	ts.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ts.stub = tunnelpb.NewTunnelServiceClient(ts.conn)
	t.Cleanup(func() {
		_ = ts.conn.Close()
		ts.server.Stop()
		<-served
	})
	return ts
}

// forward opens a forward tunnel to ts, closed at cleanup.
func (ts *testServer) forward(t testing.TB, opts ...TunnelOption) TunnelChannel {
	t.Helper()
	ch, err := NewChannel(ts.stub, opts...).Start(context.Background())
	if err != nil {
		t.Fatalf("opening forward tunnel: %v", err)
	}
	t.Cleanup(ch.Close)
	return ch
}

// reverse opens n reverse tunnels to ts serving TestServer, and waits until
// the handler sees them. The server is stopped at cleanup.
func (ts *testServer) reverse(t testing.TB, n int, opts ...TunnelOption) *ReverseTunnelServer {
	t.Helper()
	rs := NewReverseTunnelServer(ts.stub, opts...)
	grpchantesting.RegisterTestServiceServer(rs, &grpchantesting.TestServer{})
	before := len(ts.handler.AllReverseTunnels())
	done := make(chan struct{}, n)
	for range n {
		go func() {
			defer func() { done <- struct{}{} }()
			_, _ = rs.Serve(context.Background())
		}()
	}
	t.Cleanup(func() {
		rs.Stop()
		for range n {
			<-done
		}
	})
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) >= before+n })
	return rs
}
