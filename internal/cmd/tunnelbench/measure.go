package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
)

// unaryPayload is the size of unary requests and responses: small, so that
// latency and call rates show the per-call overhead rather than copying.
const unaryPayload = 64

// mib is a mebibyte, the unit of the streaming rates.
const mib = 1 << 20

// probe measures one thing through cc for about d and returns one figure
// for each table row it feeds.
type probe func(ctx context.Context, cc grpc.ClientConnInterface, d time.Duration) ([]float64, error)

// unaryCall makes one small unary call through cc.
type unaryCall func(ctx context.Context, cc grpc.ClientConnInterface) error

// echoCall is the bench service's unary call: an Echo of unaryPayload bytes.
func echoCall() unaryCall {
	req := wrapperspb.Bytes(make([]byte, unaryPayload))
	return func(ctx context.Context, cc grpc.ClientConnInterface) error { return echo(ctx, cc, req) }
}

// unaryLatency returns a probe that makes sequential calls for d and
// returns the median and 99th percentile latencies, in microseconds.
func unaryLatency(call unaryCall) probe {
	return func(ctx context.Context, cc grpc.ClientConnInterface, d time.Duration) ([]float64, error) {
		var lat []time.Duration
		for end := time.Now().Add(d); len(lat) == 0 || time.Now().Before(end); {
			start := time.Now()
			if err := call(ctx, cc); err != nil {
				return nil, err
			}
			lat = append(lat, time.Since(start))
		}
		slices.Sort(lat)
		return []float64{benchkit.Micros(benchkit.Percentile(lat, 0.50)), benchkit.Micros(benchkit.Percentile(lat, 0.99))}, nil
	}
}

// unaryThroughput returns a probe that keeps callers calls in flight for d
// and reports the completed calls per second, then the CPU time the whole
// process spent per call, in microseconds: every part of the path runs in
// this process, so that is what a call costs end to end, a figure that
// other load on the machine leaves alone where it does not the rate. The
// CPU figure is 0 where the process's CPU time cannot be read.
func unaryThroughput(callers int, call unaryCall) probe {
	return func(ctx context.Context, cc grpc.ClientConnInterface, d time.Duration) ([]float64, error) {
		load, err := benchkit.CallFor(ctx, callers, d, func(ctx context.Context) error { return call(ctx, cc) })
		if err != nil {
			return nil, err
		}
		return []float64{load.Rate(), load.CPUPerCall()}, nil
	}
}

// streamThroughput returns a probe that downloads messages of size bytes on
// one server-streaming call for d and reports MiB/s. The clock starts at the
// first message, so the rate excludes opening the stream and the first round
// trip: it is the rate a long-lived stream sustains.
func streamThroughput(size int) probe {
	return func(ctx context.Context, cc grpc.ClientConnInterface, d time.Duration) ([]float64, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel() // ends the Download
		cs, err := openDownload(ctx, cc, size)
		if err != nil {
			return nil, err
		}
		msg := new(wrapperspb.BytesValue)
		if err := recvSized(cs, msg, size); err != nil {
			return nil, err
		}
		start := time.Now()
		n := 0
		for time.Since(start) < d {
			if err := recvSized(cs, msg, size); err != nil {
				return nil, err
			}
			n++
		}
		elapsed := time.Since(start)
		return []float64{float64(n) * float64(size) / mib / elapsed.Seconds()}, nil
	}
}

// recvSized receives one message into msg and checks it has size bytes.
func recvSized(cs grpc.ClientStream, msg *wrapperspb.BytesValue, size int) error {
	if err := cs.RecvMsg(msg); err != nil {
		if err == io.EOF {
			return fmt.Errorf("download ended early")
		}
		return err
	}
	if len(msg.GetValue()) != size {
		return fmt.Errorf("received %d bytes, want %d", len(msg.GetValue()), size)
	}
	return nil
}

// comparison is a probe's figures for every target compared: the median
// over the runs of each figure, or why the target could not be measured.
type comparison struct {
	figures [numTargets][]float64
	errs    [numTargets]error
}

// compare runs p through the channel of each of targets: once for warm (a
// warm-up whose figures are dropped: connections are set up, buffers grown,
// code paged in), then runs times for d. The runs interleave the targets, so
// that drift in the machine's speed during the bench affects every target
// alike. A target that fails is left out of later runs, and so is one whose
// error in errs says it could not be reached at all.
func compare(ctx context.Context, targets []target, chans [numTargets]grpc.ClientConnInterface, errs [numTargets]error, p probe, warm, d time.Duration, runs int, progress func(target, int)) comparison {
	c := comparison{errs: errs}
	var samples [numTargets][][]float64
	for _, t := range targets {
		if c.errs[t] != nil {
			continue
		}
		if _, err := p(ctx, chans[t], warm); err != nil {
			c.errs[t] = fmt.Errorf("warm-up: %w", err)
		}
	}
	for run := range runs {
		for _, t := range targets {
			if c.errs[t] != nil {
				continue
			}
			progress(t, run)
			figs, err := p(ctx, chans[t], d)
			if err != nil {
				c.errs[t] = err
				continue
			}
			samples[t] = append(samples[t], figs)
		}
	}
	for _, t := range targets {
		if c.errs[t] == nil {
			c.figures[t] = medians(samples[t])
		}
	}
	return c
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
