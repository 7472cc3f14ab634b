package main

import (
	"context"
	"fmt"
	"slices"
	"time"

	"google.golang.org/grpc"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// The call rows compare two paths to one agent on replica A: through A
// itself (the baseline) and through B, which forwards every call to A on
// A's peer port. The difference is the one hop a call crosses at most
// between replicas.
const (
	sameReplica  = 0
	crossReplica = 1
)

// callAgentKey is the key of the agent the call rows call.
const callAgentKey = "bench"

// probe measures one thing through both paths (chans, indexed by
// sameReplica and crossReplica) for about d each, the paths taking turns,
// and returns one figure for each row it feeds, for each path, or why a
// path failed.
type probe func(ctx context.Context, chans [2]grpc.ClientConnInterface, d time.Duration) (figs [2][]float64, errs [2]error)

// callSection makes the latency and throughput measurements cfg asks for
// and returns their rows, none if it asks for neither.
func callSection(ctx context.Context, cfg config, etcd *embedetcd.Server, say func(string, ...any)) []*row {
	p50 := &row{label: fmt.Sprintf("unary latency p50, %d B, sequential: via replica B (one hop) vs via A (holds the tunnel) ↓", unaryPayload), format: formatMicros, goal: ratioAtMost(1.3)}
	p99 := &row{label: "unary latency p99, the same ↓", format: formatMicros}
	rate := &row{label: fmt.Sprintf("unary throughput, %d callers: via B vs via A ↑", cfg.callers), format: formatRate, goal: ratioAtLeast(0.8)}
	cpu := &row{label: fmt.Sprintf("CPU per call, %d callers, everything in the process: via B vs via A ↓", cfg.callers), format: formatMicros}
	type timed struct {
		name  string
		probe probe
		rows  []*row
	}
	var group []timed
	if cfg.wants(keyLatency) {
		group = append(group, timed{"latency", unaryLatency, []*row{p50, p99}})
	}
	if cfg.wants(keyThroughput) {
		group = append(group, timed{"throughput", unaryThroughput(cfg.callers), []*row{rate, cpu}})
	}
	if len(group) == 0 {
		return nil
	}
	var rows []*row
	for _, tb := range group {
		rows = append(rows, tb.rows...)
	}
	fail := func(err error) []*row {
		for _, r := range rows {
			r.set(0, err)
			r.setBase(0, err)
		}
		return rows
	}

	say("calls: 2 replicas, an agent on replica A")
	b, err := startBed(ctx, etcd, "bench-calls", 2)
	if err != nil {
		return fail(err)
	}
	defer b.close()
	a, other := b.replicas[0], b.replicas[1]
	stopAgent, err := b.startAgent(ctx, a, callAgentKey, nil)
	if err != nil {
		return fail(err)
	}
	defer stopAgent()
	// Calls through B can be forwarded once B's copy of the directory
	// names A.
	if _, err := waitDir(ctx, other.dir, func() bool { return other.holds(callAgentKey, a.id) }); err != nil {
		return fail(fmt.Errorf("waiting for replica B to see the agent on A: %w", err))
	}
	chans := [2]grpc.ClientConnInterface{
		sameReplica:  benchkit.Keyed{Conn: a.callers, Key: callAgentKey},
		crossReplica: benchkit.Keyed{Conn: other.callers, Key: callAgentKey},
	}
	for _, tb := range group {
		figs, errs := compare(ctx, chans, tb.probe, cfg.duration/4, cfg.duration, cfg.runs, func(run int) {
			say("%s: run %d of %d, via A and via B in turns", tb.name, run+1, cfg.runs)
		})
		for i, r := range tb.rows {
			r.set(at(figs[crossReplica], i), errs[crossReplica])
			r.setBase(at(figs[sameReplica], i), errs[sameReplica])
		}
	}
	return rows
}

// at is figs[i], or 0 if figs has none (the path failed).
func at(figs []float64, i int) float64 {
	if i < len(figs) {
		return figs[i]
	}
	return 0
}

// compare runs p once for warm (a warm-up whose figures are dropped:
// connections are set up, the peer connection between the replicas among
// them, buffers grown), then runs times for d, and returns the median over
// the runs of each figure, for each path, or why the path failed. A path
// that fails is left out of later runs.
func compare(ctx context.Context, chans [2]grpc.ClientConnInterface, p probe, warm, d time.Duration, runs int, progress func(run int)) (figs [2][]float64, errs [2]error) {
	var samples [2][][]float64
	_, warmErrs := p(ctx, chans, warm)
	for path, err := range warmErrs {
		if err != nil {
			errs[path] = fmt.Errorf("warm-up: %w", err)
		}
	}
	for run := range runs {
		if errs[sameReplica] != nil && errs[crossReplica] != nil {
			break
		}
		progress(run)
		f, runErrs := p(ctx, skipFailed(chans, errs), d)
		for path := range chans {
			if errs[path] != nil {
				continue
			}
			if runErrs[path] != nil {
				errs[path] = runErrs[path]
				continue
			}
			samples[path] = append(samples[path], f[path])
		}
	}
	for path := range chans {
		if errs[path] == nil {
			figs[path] = medians(samples[path])
		}
	}
	return figs, errs
}

// skipFailed is chans without the paths that have failed: a probe leaves
// out a nil channel.
func skipFailed(chans [2]grpc.ClientConnInterface, errs [2]error) [2]grpc.ClientConnInterface {
	for path, err := range errs {
		if err != nil {
			chans[path] = nil
		}
	}
	return chans
}

// medians returns, for each position in the runs' figures, the median over
// the runs (the mean of the middle two for an even count).
func medians(runs [][]float64) []float64 {
	out := make([]float64, len(runs[0]))
	for i := range out {
		col := make([]float64, len(runs))
		for r, figs := range runs {
			col[r] = figs[i]
		}
		slices.Sort(col)
		m := len(col) / 2
		if len(col)%2 == 1 {
			out[i] = col[m]
		} else {
			out[i] = (col[m-1] + col[m]) / 2
		}
	}
	return out
}

// unaryLatency makes sequential calls, one through each path in turn,
// until each path has had about d, and returns each path's median and
// 99th percentile latencies, in microseconds. Taking turns call by call
// puts both paths under the same load from the rest of the machine, so
// their ratio holds steadier than the figures themselves.
func unaryLatency(ctx context.Context, chans [2]grpc.ClientConnInterface, d time.Duration) (figs [2][]float64, errs [2]error) {
	var lat [2][]time.Duration
	for end := time.Now().Add(2 * d); ; {
		live := false
		for path, cc := range chans {
			if cc == nil || errs[path] != nil {
				continue
			}
			live = true
			start := time.Now()
			if err := unaryCall(ctx, cc); err != nil {
				errs[path] = err
				continue
			}
			lat[path] = append(lat[path], time.Since(start))
		}
		if !live || time.Now().After(end) {
			break
		}
	}
	for path := range chans {
		if len(lat[path]) > 0 && errs[path] == nil {
			slices.Sort(lat[path])
			figs[path] = []float64{benchkit.Micros(benchkit.Percentile(lat[path], 0.50)), benchkit.Micros(benchkit.Percentile(lat[path], 0.99))}
		}
	}
	return figs, errs
}

func millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// throughputSlice is how long one path keeps the callers busy before the
// other path takes its turn in the throughput rows: short, so that both
// paths share the same moments of the machine's load, long enough that
// the callers' start and end at each turn cost nothing to speak of.
const throughputSlice = 200 * time.Millisecond

// unaryThroughput returns a probe that keeps callers calls in flight
// through one path at a time, in turns of throughputSlice, until each
// path has had about d, and reports each path's completed calls per
// second, then the CPU time the whole process spent per call, in
// microseconds. Every part of the path runs in this process (callers,
// replicas, agent, service, etcd), so that is what a call costs end to
// end, a figure that other load on the machine leaves alone where it does
// not the rate. The CPU figure is 0 where the process's CPU time cannot
// be read.
func unaryThroughput(callers int) probe {
	return func(ctx context.Context, chans [2]grpc.ClientConnInterface, d time.Duration) (figs [2][]float64, errs [2]error) {
		var turns [2]benchkit.Load // what the callers did through each path
		slice := min(d, throughputSlice)
		for spent := time.Duration(0); spent < d; spent += slice {
			for path, cc := range chans {
				if cc == nil || errs[path] != nil {
					continue
				}
				t, err := callFor(ctx, cc, callers, slice)
				if err != nil {
					errs[path] = err
					continue
				}
				turns[path].Add(t)
			}
		}
		for path, t := range turns {
			if t.Calls > 0 && errs[path] == nil {
				figs[path] = []float64{t.Rate(), t.CPUPerCall()}
			}
		}
		return figs, errs
	}
}

// callFor keeps callers calls in flight through cc for d.
func callFor(ctx context.Context, cc grpc.ClientConnInterface, callers int, d time.Duration) (benchkit.Load, error) {
	return benchkit.CallFor(ctx, callers, d, func(ctx context.Context) error { return unaryCall(ctx, cc) })
}
