// Command clusterbench measures a cluster of gateway replicas, in one run
// and on one machine, and prints a markdown table that can be pasted into
// the README: what a call pays for crossing from the replica its caller
// reached to the replica holding the agent's tunnel, how soon a tunnel
// that opens on one replica is routed to from the others, what an entry of
// the directory costs each replica in memory, and how many etcd writes a
// tunnel costs.
//
// Absolute figures vary from machine to machine and run to run, so every
// figure comes with a baseline measured in the same run, and its ratio to
// it: a call through the replica holding the tunnel for a call that
// crosses to it, a bare etcd put seen by watchers for a tunnel seen by the
// other replicas, a plain map of etcd's keys for the directory's entries.
// Each row also states the figure the cluster is meant to reach, and
// whether this run reached it.
//
// Everything runs on loopback: a one-member etcd inside this process
// (package embedetcd, its data in a temporary directory), and gateway
// replicas built as the grpctunnel command builds them (cluster.Join,
// cluster.NewPeering, gateway.New with Options.Cluster and ClusterToken,
// gRPC servers from ServerOptions and PeerServerOptions), each with an etcd
// client of its own, as a replica in a process of its own has. Agents are
// made with agent.New and serve gRPC's interop TestService. The memory row's
// observing replica runs in a child process of this same binary, because
// the etcd member in this one keeps memory for every key too and would be
// counted with it.
//
// Usage:
//
//	go run ./internal/cmd/clusterbench [-duration 2s] [-runs 3] [-callers 32]
//	    [-entries 10000] [-tunnels 20] [-only latency,throughput,propagation,memory,writes]
//
// The table goes to standard output and progress to standard error. The
// exit status is 1 if any measurement failed; the table then says which
// and why. A target missed is not a failure: the table says so, since on a
// busy or small machine it may be the machine's doing.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// Measurement names, for -only.
const (
	keyLatency     = "latency"
	keyThroughput  = "throughput"
	keyPropagation = "propagation"
	keyMemory      = "memory"
	keyWrites      = "writes"
)

func measurementKeys() []string {
	return []string{keyLatency, keyThroughput, keyPropagation, keyMemory, keyWrites}
}

// config is the command line.
type config struct {
	duration time.Duration // of each timed run
	runs     int           // timed runs of each timed measurement
	callers  int           // concurrent callers in the throughput row
	entries  int           // directory entries in the memory row
	tunnels  int           // tunnels opened in the propagation and writes rows
	only     []string      // measurements to make; nil for all
	profile  string        // CPU profile file; "" for none
}

// parseFlags reads the command line. Usage and errors go to stderr.
func parseFlags(args []string, stderr io.Writer) (config, error) {
	var cfg config
	var only string
	fs := flag.NewFlagSet("clusterbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&cfg.duration, "duration", 2*time.Second, "length of each timed run")
	fs.IntVar(&cfg.runs, "runs", 3, "timed runs of the latency and throughput measurements; the table shows their median")
	fs.IntVar(&cfg.callers, "callers", 32, "concurrent callers in the throughput row")
	fs.IntVar(&cfg.entries, "entries", 10000, "tunnel entries written to the directory in the memory row")
	fs.IntVar(&cfg.tunnels, "tunnels", 20, "tunnels opened one after the other in the propagation and writes rows")
	fs.StringVar(&cfg.profile, "cpuprofile", "", "write a CPU profile of the measurements to `file` (with -only throughput, of the cross-replica path and its baseline)")
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
	case cfg.runs <= 0:
		return config{}, errors.New("-runs must be positive")
	case cfg.callers <= 0:
		return config{}, errors.New("-callers must be positive")
	case cfg.entries <= 0:
		return config{}, errors.New("-entries must be positive")
	case cfg.tunnels <= 0:
		return config{}, errors.New("-tunnels must be positive")
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
	if spec, ok := os.LookupEnv(observerEnv); ok {
		// This process is the observing replica of the memory row (see
		// memory.go).
		if err := serveObserver(spec, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "clusterbench observer:", err)
			os.Exit(1)
		}
		return
	}
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "clusterbench:", err)
		os.Exit(2)
	}
	// Interrupting ends the measurements in progress; what was measured is
	// still printed and everything is shut down.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	if cfg.profile != "" {
		f, err := os.Create(cfg.profile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "clusterbench:", err)
			os.Exit(2)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "clusterbench:", err)
			os.Exit(2)
		}
	}
	err = run(ctx, cfg, os.Stdout, os.Stderr)
	stop()
	if cfg.profile != "" {
		pprof.StopCPUProfile()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "clusterbench:", err)
		os.Exit(1)
	}
}

// run makes the measurements cfg asks for and writes the report to out,
// progress to log. It returns once everything it started has stopped, with
// an error if any measurement failed.
func run(ctx context.Context, cfg config, out, log io.Writer) error {
	say := func(format string, args ...any) {
		fmt.Fprintf(log, "clusterbench: "+format+"\n", args...)
	}
	fmt.Fprintln(out, "## clusterbench: gateway replicas on one etcd")
	fmt.Fprintln(out)
	benchkit.WriteMachine(out, benchkit.GRPC, benchkit.Module{Name: "etcd", Path: "go.etcd.io/etcd/server/v3"})
	fmt.Fprintf(out, "- settings: -duration %v -runs %d -callers %d -entries %d -tunnels %d\n",
		cfg.duration, cfg.runs, cfg.callers, cfg.entries, cfg.tunnels)
	fmt.Fprintln(out)

	// Every measurement needs etcd: without it there is no table.
	etcd, stopEtcd, err := startEtcd()
	if err != nil {
		return err
	}
	say("etcd serving at %s", etcd.URL)
	// The quiet measurements come first, while etcd holds little; the
	// memory row, which fills it, comes last.
	var rows []*row
	rows = append(rows, callSection(ctx, cfg, etcd, say)...)
	if cfg.wants(keyPropagation) {
		rows = append(rows, propagationSection(ctx, cfg, etcd, say)...)
	}
	if cfg.wants(keyWrites) {
		rows = append(rows, writesSection(ctx, cfg, etcd, say)...)
	}
	if cfg.wants(keyMemory) {
		rows = append(rows, memorySection(ctx, cfg, etcd, say)...)
	}
	stopEtcd()

	writeTable(out, rows)
	fmt.Fprintln(out)
	writeNotes(out, cfg)

	failed := 0
	for _, r := range rows {
		if r.err != nil || r.baseErr != nil {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d measurements failed", failed)
	}
	return nil
}

// startEtcd runs the cluster's etcd in a temporary directory; stop ends it
// and removes the directory.
func startEtcd() (s *embedetcd.Server, stop func(), err error) {
	dir, err := os.MkdirTemp("", "clusterbench-etcd-")
	if err != nil {
		return nil, nil, err
	}
	if s, err = embedetcd.Start(dir); err != nil {
		_ = os.RemoveAll(dir)
		return nil, nil, fmt.Errorf("etcd: %w", err)
	}
	return s, func() { s.Stop(); _ = os.RemoveAll(dir) }, nil
}

// writeNotes says how the rows were measured.
func writeNotes(out io.Writer, cfg config) {
	runs := fmt.Sprintf("the median of %d runs of %v of each path, after a warm-up", cfg.runs, cfg.duration)
	if cfg.runs == 1 {
		runs = fmt.Sprintf("from one run of %v of each path, after a warm-up", cfg.duration)
	}
	fmt.Fprintln(out, "Lower is better in rows marked ↓, higher in rows marked ↑; the ratio is the figure divided by its baseline.")
	fmt.Fprintln(out)
	fmt.Fprintln(out, "- Everything shares this process and crosses loopback TCP: a one-member etcd (embedded, its data on local disk), "+
		"gateway replicas built as `grpctunnel gateway --etcd` builds them (without TLS), each with its own etcd client and its peer port, "+
		"agents made with agent.New (one tunnel each) and gRPC's interop TestService behind them. "+
		"Replicas, agents, callers and etcd share the machine's CPUs, so a hop between replicas costs the whole path CPU, not just time.")
	if cfg.wants(keyLatency) || cfg.wants(keyThroughput) {
		fmt.Fprintf(out, "- Call rows: 2 replicas, one agent connected to replica A. The baseline calls through A, which holds the tunnel; "+
			"the figure through B, which forwards each call on its peer port to A (one hop). UnaryCall of %d B each way, "+
			"each caller path on a connection of its own. Figures are %s; within a run the two paths take turns, "+
			"call by call for latency and every %v for throughput, so that other work on the machine weighs on both alike. "+
			"CPU per call is the process's CPU time (getrusage) in the throughput runs divided by the calls made: everything above, together.\n",
			unaryPayload, runs, throughputSlice)
	}
	if cfg.wants(keyPropagation) {
		fmt.Fprintf(out, "- Propagation rows: 3 replicas; %d agents, one after the other, each opening one tunnel on replica A. "+
			"Each is timed from the tunnel's opening (the earlier of the gateway's OnReverseTunnelOpen and the agent's TunnelOpen) "+
			"until the Directory.Holders of both other replicas name A, and until a UnaryCall through each of them has been answered by the agent. "+
			"The baseline is a bare etcd Put of a new key, timed until watches on two other etcd clients have delivered it, "+
			"taking turns with the tunnels.\n", cfg.tunnels)
	}
	if cfg.wants(keyMemory) {
		fmt.Fprintf(out, "- Memory row: one replica writes %s tunnel entries (Directory.AddTunnel, one agent each, keys of %d bytes) "+
			"while another, alone in a child process, watches them arrive; the figure is that process's live heap growth "+
			"(HeapAlloc after runtime.GC, the least of %d readings %v apart, as an idle replica still talks to etcd now and then) divided by %s. The baseline is the same process's growth when it keeps a plain "+
			"map from each etcd key to its value, read with one Get of the directory: the least a replica could keep.\n",
			benchkit.Thousands(float64(cfg.entries)), len(memoryAgentKey(0)), steadyReadings, steadyEvery, benchkit.Thousands(float64(cfg.entries)))
	}
	if cfg.wants(keyWrites) {
		fmt.Fprintf(out, "- Writes rows: 2 replicas; %d agents open a tunnel each on replica A, one after the other, then %s calls go through A and B from %d callers at once, "+
			"then the agents stop, one after the other. Writes are the growth of etcd's revision (the Header.Revision of a Get) over each phase, "+
			"read once it has stopped moving, divided by the tunnels or calls: every Put, Delete or transaction moves it by one, "+
			"lease keepalives do not, and nothing else writes to this etcd meanwhile. "+
			"Each tunnel is waited for until the other replica's directory shows the change, so no two share a transaction "+
			"(tunnels opening or closing together are written in one, which costs less).\n",
			cfg.tunnels, benchkit.Thousands(writesCalls), cfg.callers)
	}
}
