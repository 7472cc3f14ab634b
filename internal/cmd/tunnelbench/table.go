package main

import (
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
)

// row is one line of a table: one quantity for each target of the table,
// each with its ratio to direct gRPC. Only the targets of its table are set.
type row struct {
	label  string
	format func(float64) string
	values [numTargets]float64
	errs   [numTargets]error
}

// set records the figure (or the failure) of target t.
func (r *row) set(t target, v float64, err error) {
	r.values[t], r.errs[t] = v, err
}

// cell is the value of target t as printed.
func (r *row) cell(t target) string {
	if r.errs[t] != nil {
		return "error"
	}
	return r.format(r.values[t])
}

// ratio is target t's value divided by direct gRPC's, as printed.
func (r *row) ratio(t target) string {
	d := r.values[direct]
	if r.errs[t] != nil || r.errs[direct] != nil || d == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f×", r.values[t]/d)
}

// writeTable prints rows as one markdown table with a column for each of
// targets, the first of which is direct gRPC; every other target's column is
// followed by its ratio to direct. The failures follow the table, if any,
// with their causes.
func writeTable(w io.Writer, targets []target, rows []*row) {
	var head, align, line strings.Builder
	head.WriteString("|")
	align.WriteString("|:--|")
	for i, t := range targets {
		fmt.Fprintf(&head, " | %v", t)
		align.WriteString("--:|")
		if i > 0 {
			fmt.Fprintf(&head, " | %s ÷ %s", t.short(), targets[0].short())
			align.WriteString("--:|")
		}
	}
	fmt.Fprintln(w, head.String()+" |")
	fmt.Fprintln(w, align.String())
	for _, r := range rows {
		line.Reset()
		fmt.Fprintf(&line, "| %s", r.label)
		for i, t := range targets {
			fmt.Fprintf(&line, " | %s", r.cell(t))
			if i > 0 {
				fmt.Fprintf(&line, " | %s", r.ratio(t))
			}
		}
		fmt.Fprintln(w, line.String()+" |")
	}
	first := true
	for _, r := range rows {
		for _, t := range targets {
			if r.errs[t] == nil {
				continue
			}
			if first {
				fmt.Fprintln(w, "\nFailures:")
				first = false
			}
			fmt.Fprintf(w, "- %s, %s: %v\n", r.label, t, r.errs[t])
		}
	}
}

// Formats of the table's units.

func formatMicros(v float64) string { return benchkit.Decimals(v) + " µs" }

func formatRate(v float64) string { return benchkit.Thousands(v) + " calls/s" }

func formatMsgRate(v float64) string { return benchkit.Thousands(v) + " msg/s" }

func formatMiBps(v float64) string { return benchkit.Decimals(v) + " MiB/s" }

func formatHeap(v float64) string {
	if math.Abs(v) >= 1024 {
		return fmt.Sprintf("%.1f KiB", v/1024)
	}
	return fmt.Sprintf("%.0f B", v)
}

func formatCount(v float64) string { return fmt.Sprintf("%.2f", v) }

// formatSize prints a byte count the way -size is best read.
func formatSize(n int) string {
	switch {
	case n >= mib && n%mib == 0:
		return fmt.Sprintf("%d MiB", n/mib)
	case n >= 1024 && n%1024 == 0:
		return fmt.Sprintf("%d KiB", n/1024)
	}
	return fmt.Sprintf("%d B", n)
}
