// Command forward shows a forward tunnel pinning many calls to one backend.
//
// A client that talks to a service through a load balancer normally has its
// calls spread over every backend, which is what one wants for independent
// calls. Some conversations need the opposite: several calls that must all
// reach the same backend, because it holds state for them. A forward tunnel
// gives that: it is a single long-lived stream, so the balancer places it
// once, and every call made through it is handled by whichever backend
// accepted the tunnel.
//
// The example starts two backends in this process and a client whose
// connection balances round-robin over both. It makes plain calls, which
// alternate between the backends, then opens a tunnel over the same
// connection and makes calls through it, which all land on one backend. It
// prints what happens and exits 0, or exits 1 with the reason if any step
// fails or takes too long.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// callsPerPhase is how many calls the client makes directly and then through
// the tunnel. It is even, so that round-robin over two backends gives each
// the same share of the direct calls.
const callsPerPhase = 4

func main() {
	// The timeout bounds the whole run, so a broken tunnel makes the example
	// fail rather than hang.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := run(ctx, os.Stdout); err != nil {
		cancel()
		fmt.Fprintln(os.Stderr, "forward example failed:", err)
		os.Exit(1)
	}
}

// run starts two backends and a balancing client, shows where direct and
// tunneled calls land, and shuts everything down. It writes its narration to
// w and returns once every goroutine it started has ended.
func run(ctx context.Context, w io.Writer) error {
	var addrs []resolver.Address
	for _, name := range []string{"backend-a", "backend-b"} {
		addr, stop, err := startBackend(name)
		if err != nil {
			return err
		}
		defer stop()
		addrs = append(addrs, resolver.Address{Addr: addr})
		fmt.Fprintf(w, "%s: serving DeviceService directly and through forward tunnels\n", name)
	}

	// A client-side round-robin balancer stands in for whatever load
	// balancer sits in front of real backends.
	r := manual.NewBuilderWithScheme("example")
	r.InitialState(resolver.State{Addresses: addrs})
	conn, err := grpc.NewClient(r.Scheme()+":///backends",
		grpc.WithResolvers(r),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	direct := demopb.NewDeviceServiceClient(conn)

	// Round-robin only spreads calls over backends it has connected to.
	// Call until both have answered, so that the calls shown below alternate
	// as they would on a warmed-up connection.
	seen := map[string]bool{}
	for len(seen) < len(addrs) {
		st, err := direct.GetStatus(ctx, &demopb.GetStatusRequest{}, grpc.WaitForReady(true))
		if err != nil {
			return fmt.Errorf("warming up: %w", err)
		}
		seen[st.GetServedBy()] = true
	}

	spread := map[string]int{}
	for i := 1; i <= callsPerPhase; i++ {
		st, err := direct.GetStatus(ctx, &demopb.GetStatusRequest{})
		if err != nil {
			return fmt.Errorf("direct GetStatus: %w", err)
		}
		spread[st.GetServedBy()]++
		fmt.Fprintf(w, "client -> GetStatus, direct call %d: answered by %s (%s)\n", i, st.GetServedBy(), st.GetState())
	}
	if len(spread) != len(addrs) {
		return fmt.Errorf("direct calls reached only %v", spread)
	}

	// The tunnel is one OpenTunnel stream on the same balanced connection:
	// the balancer picks a backend for that stream once, and every call
	// inside it goes there.
	ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn)).Start(ctx)
	if err != nil {
		return fmt.Errorf("opening the tunnel: %w", err)
	}
	defer ch.Close()
	fmt.Fprintf(w, "client: opened a forward tunnel over the same balanced connection\n")

	// The generated client works unchanged on the tunnel.
	tunneled := demopb.NewDeviceServiceClient(ch)
	pinned := ""
	for i := 1; i <= callsPerPhase; i++ {
		st, err := tunneled.GetStatus(ctx, &demopb.GetStatusRequest{})
		if err != nil {
			return fmt.Errorf("tunneled GetStatus: %w", err)
		}
		fmt.Fprintf(w, "client -> GetStatus, tunneled call %d: answered by %s (%s)\n", i, st.GetServedBy(), st.GetState())
		if pinned == "" {
			pinned = st.GetServedBy()
		} else if st.GetServedBy() != pinned {
			return fmt.Errorf("tunneled calls reached both %s and %s", pinned, st.GetServedBy())
		}
	}

	// A streaming call goes through the same tunnel, to the same backend.
	stream, err := tunneled.Tail(ctx, &demopb.TailRequest{})
	if err != nil {
		return fmt.Errorf("tunneled Tail: %w", err)
	}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("tunneled Tail: %w", err)
		}
		fmt.Fprintf(w, "client -> Tail, tunneled: received %q\n", msg.GetLine())
	}

	fmt.Fprintf(w, "summary: direct calls were spread over %d backends; all tunneled calls stayed on %s\n", len(spread), pinned)

	// Close the tunnel first and wait for it to end, then the connection;
	// the deferred calls stop the backends.
	ch.Close()
	select {
	case <-ch.Done():
	case <-ctx.Done():
		return fmt.Errorf("waiting for the tunnel to close: %w", ctx.Err())
	}
	// Err is nil for a tunnel that was closed on purpose.
	if err := ch.Err(); err != nil {
		return fmt.Errorf("the tunnel ended with an error: %w", err)
	}
	if err := conn.Close(); err != nil {
		return err
	}
	fmt.Fprintf(w, "done: tunnel and connection closed\n")
	return nil
}

// startBackend starts a gRPC server on loopback that serves DeviceService
// both as an ordinary service and, through a TunnelServiceHandler, inside
// forward tunnels. It returns the server's address and a function that stops
// it and waits for it to finish.
func startBackend(name string) (addr string, stop func(), err error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	impl := &backend{name: name}
	server := grpc.NewServer()
	demopb.RegisterDeviceServiceServer(server, impl)

	// Services served inside forward tunnels are registered on the
	// handler, not on the gRPC server; the handler itself is the one
	// tunnel service the gRPC server knows about.
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{NoReverseTunnels: true})
	demopb.RegisterDeviceServiceServer(handler, impl)
	tunnelpb.RegisterTunnelServiceServer(server, handler.Service())

	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(lis)
	}()
	return lis.Addr().String(), func() {
		server.Stop()
		<-served
	}, nil
}

// backend implements DeviceService on a server. It answers with its own name
// so that the client can tell which backend handled each call.
type backend struct {
	demopb.UnimplementedDeviceServiceServer
	name  string
	calls atomic.Int64
}

func (b *backend) GetStatus(ctx context.Context, _ *demopb.GetStatusRequest) (*demopb.GetStatusResponse, error) {
	n := b.calls.Add(1)
	state := "serving directly"
	// Handlers of tunneled calls can read the metadata that opened the
	// tunnel; for direct calls there is none.
	if _, ok := tunnel.TunnelMetadataFromIncomingContext(ctx); ok {
		state = "serving through a tunnel"
	}
	return &demopb.GetStatusResponse{ServedBy: b.name, State: state, CallsServed: n}, nil
}

func (b *backend) Tail(req *demopb.TailRequest, stream grpc.ServerStreamingServer[demopb.TailResponse]) error {
	b.calls.Add(1)
	lines := []string{b.name + ": started", b.name + ": ready"}
	if n := int(req.GetLines()); n > 0 && n < len(lines) {
		lines = lines[len(lines)-n:]
	}
	for _, l := range lines {
		if err := stream.Send(&demopb.TailResponse{Line: l}); err != nil {
			return err
		}
	}
	return nil
}
