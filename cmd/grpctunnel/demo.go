package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/internal/demo"
	"github.com/grpctunnel/grpctunnel/internal/demopb"
)

// demoKey is the demo agent's key.
const demoKey = "demo"

// demoStepTimeout bounds each wait of the demo, so that a broken tunnel
// fails it instead of hanging it.
const demoStepTimeout = 10 * time.Second

// The addresses demo --keep serves on unless told otherwise: fixed, so
// that the grpcurl commands it prints, and any a newcomer has saved from
// an earlier run, work every time. 50051 is the port gRPC's own examples
// use; the device service takes the next one. Without --keep the demo
// takes free ports instead, so that runs at once (tests, say) do not
// collide.
const (
	demoKeepListen        = "127.0.0.1:50051"
	demoKeepServiceListen = "127.0.0.1:50052"
	demoFreePort          = "127.0.0.1:0"
)

// demoConfig is the demo's command line.
type demoConfig struct {
	keep          bool
	listen        string // the gateway's address
	serviceListen string // the device service's
	replicas      int    // gateways; 2 or more make a cluster (see demoClusterRun)
}

// resolve fills in the addresses left empty: fixed with keep, free ports
// without.
func (cfg *demoConfig) resolve() {
	if cfg.listen == "" {
		cfg.listen = demoFreePort
		if cfg.keep {
			cfg.listen = demoKeepListen
		}
	}
	if cfg.serviceListen == "" {
		cfg.serviceListen = demoFreePort
		if cfg.keep {
			cfg.serviceListen = demoKeepServiceListen
		}
	}
}

// runDemo runs the demo command: the whole tunnel in one process, so that
// a newcomer can see it work before running its parts separately.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg demoConfig
	c := newCLI("demo", "grpctunnel demo [--keep | --replicas N] [flags]",
		"Runs a gateway, a sample DeviceService and an agent with key \""+demoKey+"\" for it,\n"+
			"all in this process on loopback, then calls the service through the\n"+
			"gateway as any gRPC client would and shuts everything down. With --keep\n"+
			"it prints grpcurl commands to try instead, and runs until interrupted,\n"+
			"on fixed ports so that the commands stay the same from run to run.\n\n"+
			"With --replicas N (2 to 9) it runs N gateway replicas as one cluster on an\n"+
			"etcd embedded in the process, with agents for the service on replicas 1\n"+
			"and 2, calls through every replica, then kills replica 1 as a crash would\n"+
			"and shows the others still serving until its entries expire.",
		stdout, stderr)
	c.fs.BoolVar(&cfg.keep, "keep", false, "keep running and print grpcurl commands instead of calling through the gateway itself")
	c.fs.StringVar(&cfg.listen, "listen", "", "serve the gateway on `addr`ess host:port\n(default "+demoKeepListen+" with --keep, else a free port)")
	c.fs.StringVar(&cfg.serviceListen, "service-listen", "", "serve the device service on `addr`ess host:port\n(default "+demoKeepServiceListen+" with --keep, else a free port)")
	c.fs.IntVar(&cfg.replicas, "replicas", 1, fmt.Sprintf("run `n` gateway replicas as one cluster on an embedded etcd, and kill one\n(1 to %d; 1 is the single gateway)", demoMaxReplicas))
	// The gateway warns that it serves without TLS, which on loopback is
	// noise in the middle of the demo's own account.
	logs := addLogFlags(c.fs, slog.LevelError)
	if code, ok := c.parse(args); !ok {
		return code
	}
	switch {
	case cfg.replicas < 1 || cfg.replicas > demoMaxReplicas:
		return c.fail("--replicas must be from 1 to %d, not %d: 1 runs the single gateway, 2 or more a cluster of replicas", demoMaxReplicas, cfg.replicas)
	case cfg.replicas > 1 && cfg.keep:
		return c.fail("--keep runs the single gateway's demo only: drop --keep to run the cluster's demo through, or --replicas to keep a gateway running")
	case cfg.replicas > 1 && cfg.listen != "":
		return c.fail("--listen names the single gateway's address; with --replicas each replica takes a free port")
	}
	cfg.resolve()
	run, parts := demoRun, "the agent, the gateway and the device service"
	if cfg.replicas > 1 {
		run, parts = demoClusterRun, "the agents, the replicas, etcd and the device service"
	}
	if err := run(ctx, cfg, stdout, logs.logger(stderr)); err != nil {
		fmt.Fprintln(stderr, "grpctunnel demo:", err)
		return 1
	}
	fmt.Fprintln(stdout, "stopped", parts)
	return 0
}

// demoRun starts the three parts, then calls through them or, with keep,
// waits for ctx; it stops everything it started before it returns.
func demoRun(ctx context.Context, cfg demoConfig, out io.Writer, log *slog.Logger) error {
	// The sample service: only the agent dials it.
	devAddr, stopDev, err := startDeviceService(cfg.serviceListen)
	if err != nil {
		return err
	}
	defer stopDev()
	fmt.Fprintf(out, "device service listening on %s (only the agent calls it)\n", devAddr)

	// The gateway and the agent run with the commands' defaults.
	gwCfg := defaultGatewayConfig()
	gwCfg.listen = cfg.listen
	gw, err := startGateway(gwCfg, log)
	if err != nil {
		return listenError("gateway", "--listen", err)
	}
	defer gw.stop(ctx, demoStepTimeout)
	gwAddr := dialAddr(gw.addr)
	fmt.Fprintf(out, "gateway listening on %s (agents and callers both dial it)\n", gw.addr)

	agCfg := defaultAgentConfig()
	agCfg.gateway, agCfg.key, agCfg.target = gwAddr, demoKey, dialAddr(devAddr)
	ag, err := startAgent(agCfg, log)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	// Deferred calls run last first: the agent stops before the gateway,
	// so that the gateway's drain finds no tunnel left to wait for.
	defer ag.stop(ctx, demoStepTimeout)
	waitCtx, cancel := context.WithTimeout(ctx, demoStepTimeout)
	defer cancel()
	if err := gw.g.Agent(demoKey).WaitForReady(waitCtx); err != nil {
		return fmt.Errorf("waiting for agent %q to open its tunnel: %w", demoKey, err)
	}
	fmt.Fprintf(out, "agent %q opened a tunnel to the gateway: calls with the header %s: %s now reach the device service\n",
		demoKey, gateway.DefaultKeyHeader, demoKey)

	if cfg.keep {
		printGrpcurl(out, gwAddr)
		<-ctx.Done()
		fmt.Fprintln(out, "stopping")
		return nil
	}

	conn, err := grpc.NewClient(gwAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	callCtx, cancel := context.WithTimeout(ctx, demoStepTimeout)
	defer cancel()
	return demoCalls(callCtx, conn, out)
}

// startDeviceService serves the sample DeviceService on listen, for the
// demo's agents to call; stop drains it.
func startDeviceService(listen string) (addr net.Addr, stop func(), err error) {
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, nil, listenError("device service", "--service-listen", err)
	}
	srv := grpc.NewServer()
	health := demo.Register(srv, demo.NewDeviceService(demoServiceName))
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	return lis.Addr(), func() {
		health.Shutdown()
		srv.GracefulStop()
		<-served
	}, nil
}

// demoCalls calls through the gateway as an ordinary client would.
func demoCalls(ctx context.Context, conn *grpc.ClientConn, out io.Writer) error {
	toAgent := metadata.AppendToOutgoingContext(ctx, gateway.DefaultKeyHeader, demoKey)

	services, err := listServices(toAgent, conn)
	if err != nil {
		return fmt.Errorf("listing services by reflection: %w", err)
	}
	fmt.Fprintf(out, "reflection through the gateway with %s: %s lists: %s\n", gateway.DefaultKeyHeader, demoKey, strings.Join(services, ", "))

	device := demopb.NewDeviceServiceClient(conn)
	st, err := device.GetStatus(toAgent, &demopb.GetStatusRequest{})
	if err != nil {
		return fmt.Errorf("calling GetStatus: %w", err)
	}
	fmt.Fprintf(out, "GetStatus (unary): served_by=%s state=%s calls_served=%d\n", st.GetServedBy(), st.GetState(), st.GetCallsServed())

	stream, err := device.Tail(toAgent, &demopb.TailRequest{Lines: 3})
	if err != nil {
		return fmt.Errorf("calling Tail: %w", err)
	}
	fmt.Fprintln(out, "Tail lines=3 (server streaming):")
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("calling Tail: %w", err)
		}
		fmt.Fprintf(out, "  %s\n", msg.GetLine())
	}

	resp, err := adminpb.NewAdminServiceClient(conn).ListAgents(ctx, &adminpb.ListAgentsRequest{})
	if err != nil {
		return fmt.Errorf("calling AdminService.ListAgents: %w", err)
	}
	var agents []string
	for _, a := range resp.GetAgents() {
		agents = append(agents, fmt.Sprintf("%q with %d tunnel(s)", a.GetKey(), len(a.GetTunnels())))
	}
	fmt.Fprintf(out, "AdminService.ListAgents (no %s header, so the gateway answers itself): %s\n", gateway.DefaultKeyHeader, strings.Join(agents, ", "))

	// A key no agent holds fails at once, and says so.
	_, err = device.GetStatus(metadata.AppendToOutgoingContext(ctx, gateway.DefaultKeyHeader, "nobody"), &demopb.GetStatusRequest{})
	if status.Code(err) != codes.Unavailable {
		return fmt.Errorf("GetStatus for an agent that is not connected: got %v, want Unavailable", err)
	}
	fmt.Fprintf(out, "GetStatus with %s: nobody: %s: %s\n", gateway.DefaultKeyHeader, status.Code(err), status.Convert(err).Message())
	return nil
}

// listServices asks the server reflection (v1) behind conn for its
// services.
func listServices(ctx context.Context, conn grpc.ClientConnInterface) ([]string, error) {
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}); err != nil {
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	if err := stream.CloseSend(); err != nil {
		return nil, err
	}
	// The server ends the stream once the requests have; reading to the
	// end lets the call finish rather than be cancelled.
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("after the list: %v", err)
	}
	if e := resp.GetErrorResponse(); e != nil {
		return nil, status.Error(codes.Code(e.GetErrorCode()), e.GetErrorMessage())
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names, nil
}

// listenError explains a failure to listen on a part's address: most
// often a port that another program, or another demo --keep, already
// holds, which the newcomer can only fix by stopping it or choosing
// another address with the flag named.
func listenError(part, flag string, err error) error {
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "listen" {
		return fmt.Errorf("%s: %w (stop what holds the address, or give another with %s)", part, err, flag)
	}
	return fmt.Errorf("%s: %w", part, err)
}

// dialAddr is an address a client on this machine can dial to reach a
// listener bound to addr: a listener on every interface (--listen :50051)
// reports an unspecified host, which not every client can dial, so it
// becomes IPv4 loopback, which Go's "tcp" listeners on every interface,
// dual-stack ones included, accept.
func dialAddr(addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok || !tcp.IP.IsUnspecified() {
		return addr.String()
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(tcp.Port))
}

// printGrpcurl prints commands that call through the gateway at addr, in
// shell quoting, to paste as they are.
func printGrpcurl(out io.Writer, addr string) {
	h := fmt.Sprintf("-H '%s: %s'", gateway.DefaultKeyHeader, demoKey)
	fmt.Fprintf(out, `
Try, while this runs (Ctrl-C stops it):

  # the device's services, listed by its reflection through the tunnel
  grpcurl -plaintext %[1]s %[2]s list

  # a unary call
  grpcurl -plaintext %[1]s %[2]s grpctunnel.demo.v1.DeviceService/GetStatus

  # a server-streaming call
  grpcurl -plaintext %[1]s -d '{"lines": 3}' %[2]s grpctunnel.demo.v1.DeviceService/Tail

  # without the header the gateway answers itself: its agents
  grpcurl -plaintext %[2]s grpctunnel.admin.v1.AdminService/ListAgents

`, h, addr)
}
