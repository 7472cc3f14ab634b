package main

import (
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
)

// row is one line of the table: a figure of the cluster, the baseline it
// is set against (if it has one), and the target it is meant to reach.
type row struct {
	label  string
	format func(float64) string
	goal   goal

	value float64
	err   error

	hasBase bool // the row has a baseline, measured or failed
	base    float64
	baseErr error
}

// set records the figure, or why it could not be measured.
func (r *row) set(v float64, err error) { r.value, r.err = v, err }

// setBase records the baseline, or why it could not be measured.
func (r *row) setBase(v float64, err error) { r.hasBase, r.base, r.baseErr = true, v, err }

// ratio is the figure divided by the baseline, and whether there is one.
func (r *row) ratio() (float64, bool) {
	if !r.hasBase || r.err != nil || r.baseErr != nil || r.base == 0 {
		return 0, false
	}
	return r.value / r.base, true
}

// goal is what a row's figure is meant to reach: a bound on the figure
// itself, or on its ratio to the baseline. The zero goal is none.
type goal struct {
	text    string // as printed
	ofRatio bool   // met is about the ratio, not the figure
	met     func(float64) bool
}

func ratioAtMost(x float64) goal {
	return goal{fmt.Sprintf("≤ %.2f×", x), true, func(q float64) bool { return q <= x }}
}

func ratioAtLeast(x float64) goal {
	return goal{fmt.Sprintf("≥ %.2f×", x), true, func(q float64) bool { return q >= x }}
}

// atMost bounds the figure by x, printed with the row's format.
func atMost(x float64, format func(float64) string) goal {
	return goal{"≤ " + format(x), false, func(v float64) bool { return v <= x }}
}

// exactly wants the figure to be x, to the two decimals printed.
func exactly(x float64, format func(float64) string) goal {
	return goal{"= " + format(x), false, func(v float64) bool { return format(v) == format(x) }}
}

// met says whether the row reaches its goal: yes, no, or a dash when it has
// none or it could not be told.
func (r *row) met() string {
	if r.goal.met == nil {
		return "—"
	}
	v := r.value
	if r.goal.ofRatio {
		q, ok := r.ratio()
		if !ok {
			return "n/a"
		}
		// As printed: a reader who sees 1.30× against ≤ 1.30× must
		// read yes.
		v = math.Round(q*100) / 100
	} else if r.err != nil {
		return "n/a"
	}
	if r.goal.met(v) {
		return "yes"
	}
	return "**no**"
}

// writeTable prints rows as a markdown table: figure, baseline, ratio,
// target and whether it was met. The failures follow the table, if any,
// with their causes.
func writeTable(w io.Writer, rows []*row) {
	fmt.Fprintln(w, "| | figure | baseline | ÷ baseline | target | met |")
	fmt.Fprintln(w, "|:--|--:|--:|--:|:--|:--|")
	var line strings.Builder
	for _, r := range rows {
		line.Reset()
		fmt.Fprintf(&line, "| %s | %s", r.label, cell(r.value, r.err, r.format))
		if r.hasBase {
			fmt.Fprintf(&line, " | %s", cell(r.base, r.baseErr, r.format))
			if q, ok := r.ratio(); ok {
				fmt.Fprintf(&line, " | %.2f×", q)
			} else {
				line.WriteString(" | n/a")
			}
		} else {
			line.WriteString(" | — | —")
		}
		goal := r.goal.text
		if goal == "" {
			goal = "—"
		}
		fmt.Fprintf(&line, " | %s | %s |", goal, r.met())
		fmt.Fprintln(w, line.String())
	}
	first := true
	failure := func(what string, err error) {
		if first {
			fmt.Fprintln(w, "\nFailures:")
			first = false
		}
		fmt.Fprintf(w, "- %s: %v\n", what, err)
	}
	for _, r := range rows {
		if r.err != nil {
			failure(r.label, r.err)
		}
		if r.baseErr != nil && r.baseErr != r.err {
			failure(r.label+", baseline", r.baseErr)
		}
	}
}

// cell is a figure as printed, or "error".
func cell(v float64, err error, format func(float64) string) string {
	if err != nil {
		return "error"
	}
	return format(v)
}

// Formats of the table's units.

func formatMicros(v float64) string { return benchkit.Decimals(v) + " µs" }

func formatMillis(v float64) string { return benchkit.Decimals(v) + " ms" }

func formatRate(v float64) string { return benchkit.Thousands(v) + " calls/s" }

func formatBytes(v float64) string {
	if math.Abs(v) >= 1024 {
		return fmt.Sprintf("%.2f KiB", v/1024)
	}
	return fmt.Sprintf("%.0f B", v)
}

func formatCount(v float64) string { return fmt.Sprintf("%.2f", v) }
