// Package loopback serves gRPC servers on loopback for the project's tests,
// so that each test package does not carry its own copy of the same setup.
package loopback

import (
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Serve serves srv on a free loopback port until the test ends, and
// returns a plaintext client connection to it, dialled with opts too. At cleanup the connection
// is closed, the server stopped and its Serve goroutine waited for, so
// that leak checks see nothing left behind.
func Serve(t testing.TB, srv *grpc.Server, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(ServeAddr(t, srv), append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() }) // runs before ServeAddr's cleanup
	return conn
}

// ServeAddr serves srv on a free loopback port until the test ends, and
// returns its address, for a test whose client is a command that dials
// the address itself. At cleanup the server is stopped and its Serve
// goroutine waited for.
func ServeAddr(t testing.TB, srv *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return lis.Addr().String()
}
