package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3"
	"google.golang.org/grpc/keepalive"

	"github.com/grpctunnel/grpctunnel/tunnel"
)

// cli is one subcommand's command line: its flags and how to explain them.
type cli struct {
	fs       *flag.FlagSet
	synopsis string // after "Usage: "
	about    string // a paragraph under the synopsis
	stdout   io.Writer
	stderr   io.Writer
}

// envPrefix starts the environment variable of every flag: --max-msg-size
// is also GRPCTUNNEL_MAX_MSG_SIZE.
const envPrefix = "GRPCTUNNEL"

// configFlag names the flag that reads the others from a file.
const configFlag = "config"

// newCLI returns a command line for the subcommand name with only
// --config, which every command takes.
func newCLI(name, synopsis, about string, stdout, stderr io.Writer) *cli {
	fs := flag.NewFlagSet("grpctunnel "+name, flag.ContinueOnError)
	// The flag package would print its error and the usage to its output
	// in its own format; parse prints them instead, in ours.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.String(configFlag, "", "read flags from `file`, one a line: a name, a space and the value\n(max-msg-size 8388608; a name alone sets a boolean flag); # starts a comment")
	return &cli{fs: fs, synopsis: synopsis, about: about, stdout: stdout, stderr: stderr}
}

// parse reads the flags from args, then those not given there from the
// environment (GRPCTUNNEL_<NAME>), then those still unset from the --config
// file, with peterbourgon/ff. When it returns false the command must exit
// with the status it returns: 0 after -h, 2 after a bad command line, either
// way with the usage printed.
func (c *cli) parse(args []string) (int, bool) {
	err := ff.Parse(c.fs, args,
		ff.WithEnvVarPrefix(envPrefix),
		ff.WithConfigFileFlag(configFlag),
		ff.WithConfigFileParser(ff.PlainParser))
	if inner := errors.Unwrap(err); inner != nil && strings.HasPrefix(err.Error(), "error parsing commandline arguments") {
		// The command line's own errors read as the flag package words
		// them; ff's prefix adds nothing.
		err = inner
	}
	switch {
	case errors.Is(err, flag.ErrHelp):
		c.usage(c.stdout)
		return 0, false
	case err != nil:
		return c.fail("%v", err), false
	case c.fs.NArg() > 0:
		return c.fail("unexpected argument %q", c.fs.Arg(0)), false
	}
	return 0, true
}

// fail prints a one-line complaint about the command line and the usage to
// stderr, and returns the exit status for a bad command line.
func (c *cli) fail(format string, args ...any) int {
	fmt.Fprintf(c.stderr, "%s: %s\n\n", c.fs.Name(), fmt.Sprintf(format, args...))
	c.usage(c.stderr)
	return 2
}

// usage lists every flag with its default, written --name as the synopsis
// writes them (the flag package accepts one dash or two).
func (c *cli) usage(w io.Writer) {
	fmt.Fprintf(w, "Usage: %s\n\n", c.synopsis)
	if c.about != "" {
		fmt.Fprintf(w, "%s\n\n", c.about)
	}
	fmt.Fprintln(w, "Flags (each also GRPCTUNNEL_<NAME> in the environment, --max-msg-size as")
	fmt.Fprintln(w, "GRPCTUNNEL_MAX_MSG_SIZE, or a line of the --config file; the command line")
	fmt.Fprintln(w, "wins over the environment, the environment over the file):")
	c.fs.VisitAll(func(f *flag.Flag) {
		name, text := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if name != "" {
			line += " " + name
		}
		fmt.Fprintln(w, line)
		if !isZeroDefault(f) {
			text += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintf(w, "    \t%s\n", strings.ReplaceAll(text, "\n", "\n    \t"))
	})
}

// isZeroDefault reports whether f's default says nothing worth printing.
func isZeroDefault(f *flag.Flag) bool {
	switch f.DefValue {
	case "", "false", "0":
		return true
	}
	return false
}

// requireFlags returns the exit status of a failed command line if one of
// the named flags is empty.
func (c *cli) requireFlags(flags ...string) (int, bool) {
	for _, name := range flags {
		if c.fs.Lookup(name).Value.String() == "" {
			return c.fail("--%s is required", name), false
		}
	}
	return 0, true
}

// keepaliveFlags are --keepalive-interval and --keepalive-timeout, which
// the gateway and the agent share: they set both the tunnels' keepalive and
// gRPC's on the connection under them (see defaultKeepaliveInterval).
type keepaliveFlags struct {
	interval, timeout time.Duration
}

// add adds the flags to fs, with the help text of a subcommand: interval
// and timeout describe what each does there.
func (k *keepaliveFlags) add(fs *flag.FlagSet, interval, timeout string) {
	fs.DurationVar(&k.interval, "keepalive-interval", defaultKeepaliveInterval, interval)
	fs.DurationVar(&k.timeout, "keepalive-timeout", defaultKeepaliveTimeout, timeout)
}

// check returns what is wrong with the flags, or "".
func (k *keepaliveFlags) check() string {
	switch {
	case k.interval <= 0:
		return "--keepalive-interval must be positive"
	case k.timeout <= 0:
		return "--keepalive-timeout must be positive"
	}
	return ""
}

// tunnelOption is the tunnels' keepalive.
func (k *keepaliveFlags) tunnelOption() tunnel.TunnelOption {
	return tunnel.WithKeepalive(k.interval, k.timeout)
}

// serverParams is gRPC's keepalive on the gateway's connections.
func (k *keepaliveFlags) serverParams() keepalive.ServerParameters {
	return keepalive.ServerParameters{Time: max(k.interval, minServerPingInterval), Timeout: k.timeout}
}

// clientParams is gRPC's keepalive on the agent's connection, which pings
// even between tunnels.
func (k *keepaliveFlags) clientParams() keepalive.ClientParameters {
	return keepalive.ClientParameters{Time: max(k.interval, minClientPingInterval), Timeout: k.timeout, PermitWithoutStream: true}
}

// windowSizeUsage explains --window-size, which the gateway and the agent
// share and should set alike.
const windowSizeUsage = "give each stream an HTTP/2 flow-control window of `bytes`, fixed, on the\n" +
	"connections between callers, gateway, agent and service: a tunnel carries\n" +
	"at most this much per round trip (80 MiB/s at 100ms by default); 0 lets\n" +
	"gRPC size the windows with probes, which suits long fat links but costs\n" +
	"every call two more packets on each hop; set the gateway and agents alike"

// windowSizeOption is the gateway's or the agent's WindowSize for the
// --window-size flag, whose 0 means gRPC's dynamic windows.
func windowSizeOption(flag int) int {
	if flag == 0 {
		return -1
	}
	return flag
}
