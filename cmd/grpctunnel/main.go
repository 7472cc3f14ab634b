// Command grpctunnel runs the pieces of a gRPC tunnel gateway: the gateway
// that agents and callers connect to (alone, or as one replica of a
// cluster kept in etcd), the agent that sits beside a service behind NAT,
// and a demo that runs them in one process.
//
// Usage:
//
//	grpctunnel gateway --listen ADDR [--etcd URL,... --peer-listen ADDR --cluster-token-file FILE] [flags]
//	grpctunnel agent --gateway ADDR[,ADDR...] --key KEY --target ADDR [flags]
//	grpctunnel demo [--keep | --replicas N] [flags]
//	grpctunnel demo-service --listen ADDR [flags]
//	grpctunnel certs --dir DIR --agents KEY,... --callers NAME,... [flags]
//	grpctunnel version
//
// `grpctunnel <command> -h` lists a command's flags. Logs go to standard
// error, as text or JSON (--log-format). The first SIGINT or SIGTERM drains
// and stops cleanly; a second one, or --drain-timeout, cuts the drain short.
// The exit status is 0 after a clean stop, 1 when the command fails, and 2
// for a bad command line.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// command is one subcommand. run gets the arguments after the command's
// name and returns the exit status; ctx ends at the first signal.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"gateway", "accept agents' tunnels and route callers' gRPC calls to them by key", runGateway},
		{"agent", "keep tunnels open to a gateway and forward the calls to a local gRPC service", runAgent},
		{"demo", "run a gateway, an agent and a sample service on loopback, and call through them", runDemo},
		{"certs", "write a CA, gateway, agent and caller certificates and tokens for a secure gateway", runCerts},
		{"demo-service", "serve the demo's sample service, for an agent to forward calls to", runDemoService},
		{"version", "print the version, commit and Go toolchain of this build", runVersion},
	}
}

func main() {
	ctx, stop := signalContext()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches to the subcommand args name.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "grpctunnel: a command is required")
		printUsage(stderr)
		return 2
	}
	name, rest := args[0], args[1:]
	switch name {
	case "-h", "-help", "--help", "help":
		if name == "help" && len(rest) == 1 {
			// "grpctunnel help agent" is "grpctunnel agent -h".
			name, rest = rest[0], []string{"-h"}
			break
		}
		printUsage(stdout)
		return 0
	case "-version", "--version":
		// What most tools answer to --version: the version command.
		return runVersion(ctx, rest, stdout, stderr)
	}
	for _, c := range commands() {
		if c.name == name {
			return c.run(ctx, rest, stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "grpctunnel: unknown command %q\n", name)
	printUsage(stderr)
	return 2
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "Usage: grpctunnel <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'grpctunnel <command> -h' for a command's flags.")
}

// forceKey is the context key of the channel that a second signal closes.
type forceKey struct{}

// signalContext returns a context that ends at the first SIGINT or SIGTERM
// and carries a channel (see forced) that the second one closes, so that an
// operator who does not want to wait for the drain need not reach for
// SIGKILL. signal.NotifyContext alone would drop the second signal: its
// goroutine is gone once the context is done.
func signalContext() (context.Context, func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	force := make(chan struct{})
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), forceKey{}, (<-chan struct{})(force)))
	quit := make(chan struct{})
	go func() {
		select {
		case <-sigs:
			cancel()
		case <-quit:
			return
		}
		select {
		case <-sigs:
			close(force)
		case <-quit:
		}
	}()
	return ctx, func() {
		signal.Stop(sigs)
		close(quit)
		cancel()
	}
}

// forced returns the channel a second signal closes, or nil (which never
// fires) when ctx has none, as in tests.
func forced(ctx context.Context) <-chan struct{} {
	ch, _ := ctx.Value(forceKey{}).(<-chan struct{})
	return ch
}
