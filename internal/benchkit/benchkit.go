// Package benchkit is what the project's bench commands (tunnelbench and
// clusterbench) share: the account of the machine a table was measured
// on, the process's CPU time, keeping callers busy for a while, the
// number formats of the tables, and the service they call, so that both
// measure and print their figures alike.
package benchkit

import (
	"context"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Load is what CallFor measured: the calls completed in the time it ran,
// and the CPU time the whole process spent meanwhile.
type Load struct {
	Calls   int64
	Elapsed time.Duration
	CPU     time.Duration
	// CPUOK is false where the process's CPU time cannot be read.
	CPUOK bool
}

// Add adds u, measured later, to l: both together, as one longer Load.
func (l *Load) Add(u Load) {
	l.CPUOK = u.CPUOK && (l.CPUOK || l.Calls == 0)
	l.Calls += u.Calls
	l.Elapsed += u.Elapsed
	l.CPU += u.CPU
}

// Rate is the calls completed per second.
func (l Load) Rate() float64 { return float64(l.Calls) / l.Elapsed.Seconds() }

// CPUPerCall is the process's CPU time per call, in microseconds: every
// part of a bench's path runs in its process, so that is what a call costs
// end to end. It is 0 where the CPU time cannot be read.
func (l Load) CPUPerCall() float64 {
	if !l.CPUOK || l.Calls == 0 {
		return 0
	}
	return Micros(l.CPU) / float64(l.Calls)
}

// CallFor keeps callers goroutines calling call, one call after the other
// each, for d, and returns what they did. The first failure stops every
// caller and is returned.
func CallFor(ctx context.Context, callers int, d time.Duration, call func(context.Context) error) (Load, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var calls atomic.Int64
	var once sync.Once
	var firstErr error
	var wg sync.WaitGroup
	cpuStart, cpuOK := ProcessCPU()
	start := time.Now()
	end := start.Add(d)
	for range callers {
		wg.Go(func() {
			for time.Now().Before(end) {
				if err := call(ctx); err != nil {
					once.Do(func() { firstErr = err; cancel() })
					return
				}
				calls.Add(1)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpuEnd, cpuEndOK := ProcessCPU()
	if firstErr != nil {
		return Load{}, firstErr
	}
	return Load{Calls: calls.Load(), Elapsed: elapsed, CPU: cpuEnd - cpuStart, CPUOK: cpuOK && cpuEndOK}, nil
}

// Percentile returns the q-quantile (0 < q <= 1) of sorted values, by the
// nearest-rank method.
func Percentile[T any](sorted []T, q float64) T {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

// Micros is d in microseconds.
func Micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Decimals prints v with about three significant digits, never in
// exponent form.
func Decimals(v float64) string {
	switch a := math.Abs(v); {
	case a >= 100:
		return Thousands(v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// Thousands prints v rounded to an integer with commas between groups of
// three digits.
func Thousands(v float64) string {
	s := fmt.Sprintf("%.0f", math.Abs(v))
	var b strings.Builder
	if v < 0 && s != "0" {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
