package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// agentTunnels is how many tunnels each agent keeps open, as the grpctunnel
// command's agent does by default.
const agentTunnels = 1

// benchAgentKey is the key of the agent in the timed gateway rows.
const benchAgentKey = "bench"

// quiet discards the gateway's and the agents' logs: a line for each tunnel
// is noise in a bench that opens thousands.
var quiet = slog.New(slog.DiscardHandler)

// insecureCreds is for every connection of the bench, all on loopback.
var insecureCreds = grpc.WithTransportCredentials(insecure.NewCredentials())

// newGateway builds a gateway the way its users do, with gateway.New, the
// server options it gives, and its registration, and serves it on lis
// until the returned stop is called. opts may set what the bench needs to
// observe; its logger is replaced.
func newGateway(lis net.Listener, opts gateway.Options) (g *gateway.Gateway, stop func(), err error) {
	opts.Logger = quiet
	g, err = gateway.New(opts)
	if err != nil {
		return nil, nil, err
	}
	srv := grpc.NewServer(g.ServerOptions()...)
	g.Register(srv)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	return g, func() { srv.Stop(); <-served }, nil
}

// runAgent starts an agent with key that opens agentTunnels tunnels on
// toGateway and forwards calls to toService, as the grpctunnel command's
// agent does. The returned stop ends it and waits for Run to return.
func runAgent(ctx context.Context, toGateway, toService grpc.ClientConnInterface, key string) (stop func(), err error) {
	a, err := agent.New(toGateway, toService, agent.Options{
		Key:       key,
		Logger:    quiet,
		Reconnect: tunnel.ReconnectOptions{Tunnels: agentTunnels},
	})
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = a.Run(ctx)
	}()
	return func() { a.Stop(); <-done }, nil
}

// gatewayBed is the path the gateway's users run, on loopback: a caller
// reaches the interop TestService through a real gateway and a real agent
// connected to it, with the L4 baseline beside them and direct gRPC to the
// same service. With a delay, the agent hop (the connection between agent
// and gateway, and the L4 forwarder's multiplexed connection) goes through
// a relay, and so does direct gRPC's only connection. Everything a
// gatewayBed starts is stopped by close.
type gatewayBed struct {
	service    *benchkit.TestService
	directAddr string // the service, or a relay to it
	gatewayLis net.Listener
	l4         *l4Forward

	cleanups []func() // run last first by close
}

// startGatewayBed starts a gatewayBed whose agent hop has the given one-way
// delay (none if zero), and returns once the agent's tunnels are all open.
func startGatewayBed(ctx context.Context, delay time.Duration) (b *gatewayBed, err error) {
	b = &gatewayBed{}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	inPart("service", func() { b.service, err = benchkit.StartTestService() })
	if err != nil {
		return nil, err
	}
	b.onClose(b.service.Stop)
	if b.directAddr, err = b.delayed(b.service.Addr, delay); err != nil {
		return nil, err
	}

	// The gateway, on its own port.
	if b.gatewayLis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	var g *gateway.Gateway
	var stopGateway func()
	inPart("gateway", func() { g, stopGateway, err = newGateway(b.gatewayLis, gateway.Options{}) })
	if err != nil {
		_ = b.gatewayLis.Close()
		return nil, err
	}
	b.onClose(stopGateway)

	// The agent, dialling out to the gateway, with a connection of its own
	// to the service.
	agentHop, err := b.delayed(b.gatewayLis.Addr().String(), delay)
	if err != nil {
		return nil, err
	}
	inPart("agent", func() { err = b.startAgent(ctx, agentHop) })
	if err != nil {
		return nil, err
	}
	if err := waitForAgent(ctx, g, benchAgentKey, agentTunnels); err != nil {
		return nil, err
	}

	inPart("l4", func() { b.l4, err = startL4Forward(b.service.Addr, delay) })
	if err != nil {
		return nil, err
	}
	b.onClose(b.l4.close)
	return b, nil
}

// startAgent connects the bench agent to the gateway at gatewayAddr and to
// the service, as grpctunnel agent dials them, and starts it.
func (b *gatewayBed) startAgent(ctx context.Context, gatewayAddr string) error {
	toGateway, err := b.dial(gatewayAddr, agent.DialOptions(0)...)
	if err != nil {
		return err
	}
	toService, err := b.dial(b.service.Addr, agent.DialOptions(0)...)
	if err != nil {
		return err
	}
	stop, err := runAgent(ctx, toGateway, toService, benchAgentKey)
	if err != nil {
		return err
	}
	b.onClose(stop)
	return nil
}

// onClose arranges for f to run when the bed closes, before whatever was
// arranged earlier.
func (b *gatewayBed) onClose(f func()) { b.cleanups = append(b.cleanups, f) }

// close ends every connection, agent, forwarder, relay and server of the
// bed, callers first, and returns once all of their goroutines are done.
func (b *gatewayBed) close() {
	for i := len(b.cleanups) - 1; i >= 0; i-- {
		b.cleanups[i]()
	}
	b.cleanups = nil
}

// delayed returns the address to dial to reach addr with the given one-way
// delay: addr itself if there is none, else a relay's.
func (b *gatewayBed) delayed(addr string, delay time.Duration) (string, error) {
	if delay <= 0 {
		return addr, nil
	}
	var r *relay
	var err error
	inPart("relay", func() { r, err = startRelay(addr, delay) })
	if err != nil {
		return "", err
	}
	b.onClose(r.close)
	return r.addr(), nil
}

// dial opens a new client connection to addr with opts, closed with the
// bed.
func (b *gatewayBed) dial(addr string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, append(opts, insecureCreds)...)
	if err != nil {
		return nil, err
	}
	b.onClose(func() { _ = conn.Close() })
	return conn, nil
}

// connect returns a channel to the TestService through t, on a new
// connection of its own.
func (b *gatewayBed) connect(_ context.Context, t target) (grpc.ClientConnInterface, error) {
	switch t {
	case direct:
		return b.dial(b.directAddr)
	case viaGateway:
		conn, err := b.dial(b.gatewayLis.Addr().String())
		if err != nil {
			return nil, err
		}
		return benchkit.Keyed{Conn: conn, Key: benchAgentKey}, nil
	case viaL4:
		return b.dial(b.l4.addr())
	}
	return nil, fmt.Errorf("unknown target %v", t)
}

// waitForAgent waits until the gateway has tunnels open with key, so that
// no measurement starts while the agent is still connecting.
func waitForAgent(ctx context.Context, g *gateway.Gateway, key string, tunnels int) error {
	ctx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		for _, a := range g.Agents() {
			if a.GetKey() == key && len(a.GetTunnels()) >= tunnels {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for agent %q's %d tunnels: %w", key, tunnels, ctx.Err())
		case <-tick.C:
		}
	}
}
