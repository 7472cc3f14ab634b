package benchkit

import (
	"context"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/gateway"
)

// TestService is a gRPC server on loopback with gRPC's interop
// TestService registered: the service the benches call, which knows
// nothing of tunnels.
type TestService struct {
	server *grpc.Server
	// Addr is where it listens.
	Addr   string
	served chan struct{}
}

// StartTestService starts a TestService server on a loopback port.
func StartTestService() (*TestService, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &TestService{server: grpc.NewServer(), Addr: lis.Addr().String(), served: make(chan struct{})}
	testgrpc.RegisterTestServiceServer(s.server, interop.NewTestServer())
	go func() {
		defer close(s.served)
		_ = s.server.Serve(lis)
	}()
	return s, nil
}

// Stop closes every connection and returns once the server has stopped.
func (s *TestService) Stop() {
	s.server.Stop()
	<-s.served
}

// Keyed is a channel whose calls name an agent in the gateway's key
// header, as every call a client makes through the gateway does.
type Keyed struct {
	Conn grpc.ClientConnInterface
	Key  string
}

// Invoke makes a unary call naming the agent.
func (k Keyed) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	ctx = metadata.AppendToOutgoingContext(ctx, gateway.DefaultKeyHeader, k.Key)
	return k.Conn.Invoke(ctx, method, args, reply, opts...)
}

// NewStream starts a streaming call naming the agent.
func (k Keyed) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	ctx = metadata.AppendToOutgoingContext(ctx, gateway.DefaultKeyHeader, k.Key)
	return k.Conn.NewStream(ctx, desc, method, opts...)
}
