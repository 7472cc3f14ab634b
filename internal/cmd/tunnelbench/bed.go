package main

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// target is one way of reaching the bench service.
type target int

const (
	direct       target = iota // plain gRPC on the connection: the baseline
	forward                    // a forward tunnel on the connection
	reverse                    // a reverse tunnel on the connection, called from the server's end
	plainForward               // a forward tunnel whose client speaks only the plain protocol
	viaGateway                 // through a gateway and an agent (see gatewayBed)
	viaL4                      // through L4 port forwarding over yamux (see l4Forward)
	numTargets
)

// The targets of each table, direct gRPC first since it is the baseline.
var (
	tunnelTargets  = []target{direct, forward, reverse, plainForward}
	gatewayTargets = []target{direct, viaGateway, viaL4}
)

func (t target) String() string {
	switch t {
	case direct:
		return "direct gRPC"
	case forward:
		return "forward tunnel"
	case reverse:
		return "reverse tunnel"
	case plainForward:
		return "forward, plain protocol"
	case viaGateway:
		return "gateway + agent"
	case viaL4:
		return "L4 forward (yamux)"
	}
	return fmt.Sprintf("target(%d)", int(t))
}

// short is the target's name in the headings of ratio columns.
func (t target) short() string {
	switch t {
	case direct:
		return "direct"
	case forward:
		return "forward"
	case reverse:
		return "reverse"
	case plainForward:
		return "plain"
	case viaGateway:
		return "gateway"
	case viaL4:
		return "L4"
	}
	return t.String()
}

// openTimeout bounds the wait for a reverse tunnel to be seen by the
// handler, so that a broken tunnel fails the bench rather than hanging it.
const openTimeout = 30 * time.Second

// bed is a gRPC server on loopback that serves the bench service in the
// three ways the table compares: registered on the *grpc.Server itself,
// on a TunnelServiceHandler for forward tunnels, and, for reverse tunnels,
// on ReverseTunnelServers that dial it. Everything a bed starts is stopped
// by close.
type bed struct {
	server  *grpc.Server
	handler *tunnel.TunnelServiceHandler
	served  chan struct{}
	relay   *relay // nil without a delay
	addr    string // what clients dial: the relay if there is one

	cleanups []func() // run last first by close
}

// startBed starts a bed. With a positive delay, clients reach the server
// through a relay that delays each direction by that much.
func startBed(delay time.Duration) (*bed, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &bed{
		// The tunnel's frame codec, as the package tells a server that
		// accepts tunnels to use; the bench's other services fall through
		// it to gRPC's proto codec.
		server:  grpc.NewServer(grpc.ForceServerCodecV2(tunnel.Codec())),
		handler: tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{}),
		served:  make(chan struct{}),
		addr:    lis.Addr().String(),
	}
	registerBench(b.server)
	registerBench(b.handler)
	tunnelpb.RegisterTunnelServiceServer(b.server, b.handler.Service())
	go func() {
		defer close(b.served)
		_ = b.server.Serve(lis)
	}()
	if delay > 0 {
		r, err := startRelay(b.addr, delay)
		if err != nil {
			b.close()
			return nil, err
		}
		b.relay = r
		b.addr = r.addr()
	}
	return b, nil
}

// onClose arranges for f to run when the bed closes, before whatever was
// arranged earlier.
func (b *bed) onClose(f func()) { b.cleanups = append(b.cleanups, f) }

// close ends every tunnel and connection made on the bed, then stops the
// server and the relay, and returns once all of their goroutines are done.
func (b *bed) close() {
	for i := len(b.cleanups) - 1; i >= 0; i-- {
		b.cleanups[i]()
	}
	b.cleanups = nil
	b.server.Stop()
	<-b.served
	if b.relay != nil {
		b.relay.close()
	}
}

// dial opens a new client connection to the bed. Each target gets its own
// so that one measurement cannot inherit another's state: gRPC grows a
// connection's flow-control windows as it estimates the bandwidth-delay
// product, and that would favour whichever target ran second.
func (b *bed) dial() (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(b.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	b.onClose(func() { _ = conn.Close() })
	return conn, nil
}

// connect returns a channel to the bench service through t, on a new
// connection. The bed's handler must have no other reverse tunnels, since
// the reverse channel spreads calls over all of them.
func (b *bed) connect(ctx context.Context, t target) (grpc.ClientConnInterface, error) {
	conn, err := b.dial()
	if err != nil {
		return nil, err
	}
	switch t {
	case direct:
		return conn, nil
	case forward, plainForward:
		return b.openForward(ctx, conn, t)
	case reverse:
		if _, err := b.serveReverse(ctx, conn, 1); err != nil {
			return nil, err
		}
		return b.handler.AsChannel(), nil
	}
	return nil, fmt.Errorf("unknown target %v", t)
}

// openForward opens a forward tunnel on conn; it is closed with the bed if
// not before. For plainForward the client announces no extension and keeps
// its receive windows at the protocol's customary 64 KiB, as a peer that
// implements only the published protocol does; the server then falls back
// to the plain protocol too.
func (b *bed) openForward(ctx context.Context, conn *grpc.ClientConn, t target) (tunnel.TunnelChannel, error) {
	ch, err := tunnel.NewChannel(tunnelpb.NewTunnelServiceClient(conn), forwardOptions(t)...).Start(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening a forward tunnel: %w", err)
	}
	b.onClose(ch.Close)
	return ch, nil
}

// forwardOptions are the options of a forward tunnel's client for target t.
func forwardOptions(t target) []tunnel.TunnelOption {
	if t == plainForward {
		return []tunnel.TunnelOption{tunnel.WithPlainProtocol(), tunnel.WithMaxWindowSize(flowcontrol.DefaultWindow)}
	}
	return nil
}

// serveReverse opens n reverse tunnels on conn, each served by a goroutine
// of its own as ReverseTunnelServer.Serve requires, and returns once the
// bed's handler has them all. The returned stop ends them and waits for
// those goroutines; the bed calls it on close if it was not called before.
func (b *bed) serveReverse(ctx context.Context, conn *grpc.ClientConn, n int) (stop func(), err error) {
	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	registerBench(rs)
	want := len(b.handler.AllReverseTunnels()) + n
	failed := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if started, err := rs.Serve(ctx); !started {
				failed <- err
			}
		})
	}
	stop = sync.OnceFunc(func() {
		rs.Stop()
		wg.Wait()
	})
	b.onClose(stop)

	waitCtx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for len(b.handler.AllReverseTunnels()) < want {
		select {
		case err := <-failed:
			return nil, fmt.Errorf("opening a reverse tunnel: %w", err)
		case <-waitCtx.Done():
			return nil, fmt.Errorf("waiting for %d reverse tunnels: %w", n, waitCtx.Err())
		case <-tick.C:
		}
	}
	return stop, nil
}
