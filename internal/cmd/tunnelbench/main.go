// Command tunnelbench measures forward and reverse tunnels, and the
// gateway with its agents, against direct gRPC, in the same run and on the
// same machine, and prints markdown tables that can be pasted into the
// README.
//
// A tunnel's cost only means something next to what the same work costs
// without it, and absolute figures vary from machine to machine and run to
// run, so every tunnel figure comes with its ratio to direct gRPC measured
// moments before or after it. Everything runs over loopback TCP. The tunnel
// rows run in this process: a gRPC server with the bench service registered
// directly, on a TunnelServiceHandler for forward tunnels and on a
// ReverseTunnelServer for reverse ones, and a relay that delays bytes to
// imitate a long link. The gateway rows run a real gateway and agent in
// front of gRPC's interop TestService, beside L4 port forwarding over yamux
// (see gatewaySection); their memory rows run the server in a child process
// of this same binary, so that its resident memory can be read alone.
//
// Usage:
//
//	go run ./internal/cmd/tunnelbench [-duration 2s] [-runs 3] [-callers 32]
//	    [-size 1048576] [-delay 10ms] [-idle 1000] [-only latency,stream]
//	    [-cpuprofile file]
//
// The tables go to standard output and progress to standard error. The
// exit status is 1 if any measurement failed; the tables then say which
// and why.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
)

// Measurement names, for -only.
const (
	keyLatency     = "latency"
	keyThroughput  = "throughput"
	keyStream      = "stream"
	keyStreamDelay = "stream-delay"
	keyIdleTunnels = "idle-tunnels"
	keyIdleStreams = "idle-streams"

	keyGatewayLatency    = "gateway-latency"
	keyGatewayThroughput = "gateway-throughput"
	keyGatewayStream     = "gateway-stream"
	keyGatewayDelay      = "gateway-delay"
	keyGatewayMemory     = "gateway-memory"
)

func measurementKeys() []string {
	return []string{
		keyLatency, keyThroughput, keyStream, keyStreamDelay, keyIdleTunnels, keyIdleStreams,
		keyGatewayLatency, keyGatewayThroughput, keyGatewayStream, keyGatewayDelay, keyGatewayMemory,
	}
}

// config is the command line.
type config struct {
	duration time.Duration // of each timed run
	delay    time.Duration // one way, for the delayed rows
	size     int           // of streamed messages, in bytes
	callers  int           // concurrent unary callers
	idle     int           // idle tunnels, streams or agents to open
	runs     int           // timed runs of each measurement
	only     []string      // measurements to make; nil for all

	cpuProfile string // file for a CPU profile of the whole run; "" for none
}

// parseFlags reads the command line. Usage and errors go to stderr.
func parseFlags(args []string, stderr io.Writer) (config, error) {
	var cfg config
	var only string
	fs := flag.NewFlagSet("tunnelbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&cfg.duration, "duration", 2*time.Second, "length of each timed run")
	fs.DurationVar(&cfg.delay, "delay", 10*time.Millisecond, "one-way delay of the relayed link in the delayed rows")
	fs.IntVar(&cfg.size, "size", mib, "size in bytes of each streamed message")
	fs.IntVar(&cfg.callers, "callers", 32, "concurrent callers in the unary throughput row")
	fs.IntVar(&cfg.idle, "idle", 1000, "how many idle tunnels or streams to open in the idle rows, and agents in the gateway's memory rows")
	fs.IntVar(&cfg.runs, "runs", 3, "timed runs of each measurement; the table shows their median")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run to `file`")
	fs.StringVar(&only, "only", "", "comma-separated measurements to make, of: "+strings.Join(measurementKeys(), ", "))
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	switch {
	case cfg.duration <= 0:
		return config{}, errors.New("-duration must be positive")
	case cfg.delay <= 0:
		return config{}, errors.New("-delay must be positive")
	case cfg.size <= 0:
		return config{}, errors.New("-size must be positive")
	case cfg.callers <= 0:
		return config{}, errors.New("-callers must be positive")
	case cfg.idle <= 0:
		return config{}, errors.New("-idle must be positive")
	case cfg.runs <= 0:
		return config{}, errors.New("-runs must be positive")
	}
	if only != "" {
		for key := range strings.SplitSeq(only, ",") {
			key = strings.TrimSpace(key)
			if !slices.Contains(measurementKeys(), key) {
				return config{}, fmt.Errorf("-only: unknown measurement %q; known: %s", key, strings.Join(measurementKeys(), ", "))
			}
			cfg.only = append(cfg.only, key)
		}
	}
	return cfg, nil
}

// wants reports whether measurement key is to be made.
func (c config) wants(key string) bool {
	return c.only == nil || slices.Contains(c.only, key)
}

func main() {
	if kind, ok := os.LookupEnv(childEnv); ok {
		// This process is the server of a memory measurement (see child.go).
		if err := serveChild(kind, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "tunnelbench child:", err)
			os.Exit(1)
		}
		return
	}
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "tunnelbench:", err)
		os.Exit(2)
	}
	// Interrupting ends the measurements in progress; what was measured is
	// still printed and everything is shut down.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err = run(ctx, cfg, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnelbench:", err)
		os.Exit(1)
	}
}

// timedBench is a measurement made over and over for a set time, and the
// rows of the table it fills.
type timedBench struct {
	key     string
	name    string // for progress
	delayed bool   // through the delaying relay
	probe   probe
	rows    []*row
}

// run makes the measurements cfg asks for and writes the report to out,
// progress to log. It returns once everything it started has stopped, with
// an error if any measurement failed.
func run(ctx context.Context, cfg config, out, log io.Writer) error {
	say := func(format string, args ...any) {
		fmt.Fprintf(log, "tunnelbench: "+format+"\n", args...)
	}
	if cfg.cpuProfile != "" {
		stop, err := startCPUProfile(cfg.cpuProfile)
		if err != nil {
			return err
		}
		defer stop()
	}
	fmt.Fprintln(out, "## tunnelbench: tunnels and the gateway against direct gRPC")
	fmt.Fprintln(out)
	benchkit.WriteMachine(out, benchkit.GRPC)
	fmt.Fprintf(out, "- settings: -duration %v -runs %d -callers %d -size %d (%s) -delay %v -idle %d\n",
		cfg.duration, cfg.runs, cfg.callers, cfg.size, formatSize(cfg.size), cfg.delay, cfg.idle)
	fmt.Fprintln(out)

	tunnelRows := tunnelSection(ctx, cfg, say)
	gatewayRows := gatewaySection(ctx, cfg, say)

	runs := fmt.Sprintf("the median of %d runs of %v each", cfg.runs, cfg.duration)
	if cfg.runs == 1 {
		runs = fmt.Sprintf("from one run of %v", cfg.duration)
	}
	fmt.Fprintf(out, "Each figure is followed by its ratio to direct gRPC from the same run "+
		"(÷ direct): lower is better in rows marked ↓, higher is better in rows marked ↑. "+
		"Timed figures are %s, after a warm-up.\n\n", runs)
	if len(tunnelRows) > 0 {
		fmt.Fprintln(out, "### Tunnels")
		fmt.Fprintln(out)
		writeTable(out, tunnelTargets, tunnelRows)
		fmt.Fprintln(out)
		writeTunnelNotes(out, cfg)
	}
	if len(gatewayRows) > 0 {
		if len(tunnelRows) > 0 {
			fmt.Fprintln(out)
		}
		fmt.Fprintln(out, "### The gateway")
		fmt.Fprintln(out)
		writeGatewayIntro(out)
		fmt.Fprintln(out)
		writeTable(out, gatewayTargets, gatewayRows)
		fmt.Fprintln(out)
		writeGatewayNotes(out, cfg)
	}

	failed := 0
	for _, r := range append(tunnelRows, gatewayRows...) {
		for _, err := range r.errs {
			if err != nil {
				failed++
			}
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d measurements failed", failed)
	}
	return nil
}

// tunnelSection makes the tunnel measurements cfg asks for and returns
// their rows, none if it asks for none.
func tunnelSection(ctx context.Context, cfg config, say func(string, ...any)) []*row {
	latP50 := &row{label: fmt.Sprintf("unary latency p50, %d B, sequential ↓", unaryPayload), format: formatMicros}
	latP99 := &row{label: fmt.Sprintf("unary latency p99, %d B, sequential ↓", unaryPayload), format: formatMicros}
	rate := &row{label: fmt.Sprintf("unary throughput, %d callers ↑", cfg.callers), format: formatRate}
	stream := &row{label: fmt.Sprintf("server-streaming %s messages, one stream ↑", formatSize(cfg.size)), format: formatMiBps}
	small := &row{label: fmt.Sprintf("server-streaming %s messages, one stream ↑", formatSize(smallMessage)), format: formatMiBps}
	delayed := &row{label: fmt.Sprintf("server-streaming %s messages, %v one-way delay ↑", formatSize(cfg.size), cfg.delay), format: formatMiBps}
	tunnelHeap := &row{label: "heap per idle tunnel (direct: per idle gRPC stream) ↓", format: formatHeap}
	tunnelGoroutines := &row{label: "goroutines per idle tunnel (direct: per idle gRPC stream) ↓", format: formatCount}
	streamHeap := &row{label: "heap per idle stream, all in one tunnel (direct: on one connection) ↓", format: formatHeap}
	streamGoroutines := &row{label: "goroutines per idle stream, all in one tunnel (direct: on one connection) ↓", format: formatCount}

	timed := []timedBench{
		{keyLatency, "unary latency", false, unaryLatency(echoCall()), []*row{latP50, latP99}},
		{keyThroughput, "unary throughput", false, unaryThroughput(cfg.callers, echoCall()), []*row{rate}},
		{keyStream, "streaming", false, streamThroughput(cfg.size), []*row{stream}},
		{keyStream, "streaming " + formatSize(smallMessage), false, streamThroughput(smallMessage), []*row{small}},
		{keyStreamDelay, "delayed streaming", true, streamThroughput(cfg.size), []*row{delayed}},
	}
	start := func(_ context.Context, delay time.Duration) (testbed, error) {
		b, err := startBed(delay)
		if err != nil {
			return nil, err
		}
		return b, nil
	}
	rows := runTimedGroups(ctx, cfg, tunnelTargets, start, timed, say)

	// Idle tunnels have no direct counterpart; their baseline is an idle
	// gRPC stream on one connection, which is what each tunnel is built on
	// and also the baseline of idle streams, so it is measured once.
	baseline := sync.OnceValues(func() (idleCost, error) {
		say("idle: %d %v streams", cfg.idle, direct)
		return idleStreams(ctx, direct, cfg.idle)
	})
	idle := func(heap, goroutines *row, measure func(target) (idleCost, error)) {
		rows = append(rows, heap, goroutines)
		for _, t := range tunnelTargets {
			measureT := measure
			if t == direct {
				measureT = func(target) (idleCost, error) { return baseline() }
			}
			c, err := measureT(t)
			heap.set(t, c.heapBytes, err)
			goroutines.set(t, c.goroutines, err)
		}
	}
	if cfg.wants(keyIdleTunnels) {
		idle(tunnelHeap, tunnelGoroutines, func(t target) (idleCost, error) {
			say("idle: %d %vs", cfg.idle, t)
			return idleTunnels(ctx, t, cfg.idle)
		})
	}
	if cfg.wants(keyIdleStreams) {
		idle(streamHeap, streamGoroutines, func(t target) (idleCost, error) {
			say("idle: %d streams in one %v", cfg.idle, t)
			return idleStreams(ctx, t, cfg.idle)
		})
	}
	return rows
}

// writeTunnelNotes says how the tunnel rows were measured.
func writeTunnelNotes(out io.Writer, cfg config) {
	fmt.Fprintln(out, "- Every call crosses loopback TCP, with client and server in this one process. "+
		"Each target has a connection of its own; the delayed row reaches the server through an in-process "+
		"relay that holds every chunk of bytes for the delay in each direction without limiting bandwidth, "+
		"and direct gRPC goes through it too.")
	fmt.Fprintf(out, "- Idle rows open %d tunnels or streams and count both ends: heap is the growth of "+
		"HeapAlloc measured after runtime.GC, goroutines the growth of runtime.NumGoroutine, each divided by %d. "+
		"The direct column of the idle-tunnel rows is an idle gRPC bidi stream on one connection, "+
		"what each tunnel is built on (the same figure as in the idle-stream rows). "+
		"Reverse tunnels include the goroutine that calls ReverseTunnelServer.Serve for each.\n", cfg.idle, cfg.idle)
}

// testbed is where timed measurements are made: it reaches the service
// through each target, and close stops everything it started.
type testbed interface {
	// connect returns a channel to the service through t, on a connection
	// of its own.
	connect(ctx context.Context, t target) (grpc.ClientConnInterface, error)
	close()
}

// runTimedGroups makes the timed measurements that cfg asks for among
// timed, those without a delay on one testbed and those with it on another,
// and returns their rows in order.
func runTimedGroups(ctx context.Context, cfg config, targets []target, start func(context.Context, time.Duration) (testbed, error), timed []timedBench, say func(string, ...any)) []*row {
	var rows []*row
	for _, delay := range []time.Duration{0, cfg.delay} {
		var group []timedBench
		for _, tb := range timed {
			if tb.delayed == (delay > 0) && cfg.wants(tb.key) {
				group = append(group, tb)
				rows = append(rows, tb.rows...)
			}
		}
		if len(group) > 0 {
			runTimed(ctx, cfg, targets, start, delay, group, say)
		}
	}
	return rows
}

// runTimed makes the measurements of group through targets on one testbed,
// whose link has the given one-way delay (none if zero), and fills their
// rows. The testbed is shared so that the targets of every measurement run
// on the same servers and connections.
func runTimed(ctx context.Context, cfg config, targets []target, start func(context.Context, time.Duration) (testbed, error), delay time.Duration, group []timedBench, say func(string, ...any)) {
	fail := func(t target, err error) {
		for _, tb := range group {
			for _, r := range tb.rows {
				r.set(t, 0, err)
			}
		}
	}
	b, err := start(ctx, delay)
	if err != nil {
		for _, t := range targets {
			fail(t, err)
		}
		return
	}
	defer b.close()
	var chans [numTargets]grpc.ClientConnInterface
	var errs [numTargets]error
	for _, t := range targets {
		inPart("caller", func() { chans[t], errs[t] = b.connect(ctx, t) })
	}
	for _, tb := range group {
		var c comparison
		inPart("caller", func() {
			c = compare(ctx, targets, chans, errs, tb.probe, cfg.duration/4, cfg.duration, cfg.runs, func(t target, run int) {
				say("%s: %v, run %d of %d", tb.name, t, run+1, cfg.runs)
			})
		})
		for _, t := range targets {
			for i, r := range tb.rows {
				if c.errs[t] != nil {
					r.set(t, 0, c.errs[t])
				} else {
					r.set(t, c.figures[t][i], nil)
				}
			}
		}
	}
}
