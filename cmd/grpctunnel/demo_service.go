package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"

	"github.com/grpctunnel/grpctunnel/internal/demo"
)

// demoServiceName is the name the demo service answers with by default,
// the same as the demo's own, so that calls give the same answers either
// way.
const demoServiceName = "demo-device"

// demoServiceConfig is the demo-service command line.
type demoServiceConfig struct {
	listen       string
	name         string
	drainTimeout time.Duration
}

// runDemoService serves the demo's DeviceService, with health and server
// reflection, as a process of its own: something to put behind an agent
// when trying a gateway and an agent as separate processes, without first
// writing a gRPC service.
func runDemoService(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg demoServiceConfig
	c := newCLI("demo-service", "grpctunnel demo-service --listen ADDR [flags]",
		"Serves the demo's sample grpctunnel.demo.v1.DeviceService, with gRPC health\n"+
			"(SERVING) and server reflection, in plaintext: a service to run an agent\n"+
			"beside (grpctunnel agent --target ADDR) when trying the gateway and the\n"+
			"agent as separate processes.",
		stdout, stderr)
	fs := c.fs
	fs.StringVar(&cfg.listen, "listen", "", "serve on `addr`ess host:port; port 0 picks one (required)")
	fs.StringVar(&cfg.name, "name", demoServiceName, "answer GetStatus and Notify as the device `name`, to tell services apart")
	fs.DurationVar(&cfg.drainTimeout, "drain-timeout", defaultDrainTimeout, "on SIGINT or SIGTERM, wait up to `duration` for calls in progress before closing them")
	logs := addLogFlags(fs, slog.LevelInfo)
	if code, ok := c.parse(args); !ok {
		return code
	}
	if code, ok := c.requireFlags("listen"); !ok {
		return code
	}
	if cfg.drainTimeout <= 0 {
		return c.fail("--drain-timeout must be positive")
	}
	log := logs.logger(stderr)

	lis, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		log.Error("demo service failed to start", "err", err)
		return 1
	}
	srv := grpc.NewServer()
	health := demo.Register(srv, demo.NewDeviceService(cfg.name))
	failed := make(chan error, 1)
	served := make(chan struct{})
	go func() {
		defer close(served)
		// Serve returns nil once stopped, and an error only when the
		// listener fails.
		if err := srv.Serve(lis); err != nil {
			failed <- err
		}
	}()
	// As the gateway does, the log names the bound address, which is how a
	// caller of --listen host:0 learns the port.
	log.Info("listening", "addr", lis.Addr().String(), "name", cfg.name)

	select {
	case <-ctx.Done():
		log.Info("stopping: draining calls", "timeout", cfg.drainTimeout.String())
	case err := <-failed:
		log.Error("demo service failed", "err", err)
		srv.Stop()
		<-served
		return 1
	}
	// NOT_SERVING first, so that health checks and watches (an agent's
	// caller's, say) learn of the stop before the connections close.
	health.Shutdown()
	if !waitBounded(ctx, cfg.drainTimeout, srv.GracefulStop, srv.Stop) {
		log.Warn("drain cut short: closed the calls still in progress")
	}
	<-served
	log.Info("stopped")
	return 0
}
