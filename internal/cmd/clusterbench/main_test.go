package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives the tests: run
// promises to stop every replica, agent, connection and etcd it started.
//
// The memory row runs this binary again as its observing replica (see
// memory.go); in tests that binary is the test binary, so TestMain serves
// as the observer when asked to, as main does.
func TestMain(m *testing.M) {
	if spec, ok := os.LookupEnv(observerEnv); ok {
		if err := serveObserver(spec, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "clusterbench observer:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// benchRun runs the command with args (tiny settings) and returns the
// data rows of its table, each split into its cells.
func benchRun(t *testing.T, args ...string) [][]string {
	t.Helper()
	cfg, err := parseFlags(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, progress bytes.Buffer
	if err := run(ctx, cfg, &out, &progress); err != nil {
		t.Fatalf("run: %v\noutput:\n%s\nprogress:\n%s", err, out.String(), progress.String())
	}
	if strings.Contains(out.String(), "Failures") {
		t.Fatalf("the report lists failures:\n%s", out.String())
	}
	var rows [][]string
	for line := range strings.Lines(out.String()) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "| ") || strings.HasPrefix(line, "| |") {
			continue // not a table line, the header or its separator
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		rows = append(rows, cells)
	}
	t.Logf("output:\n%s", out.String())
	return rows
}

// tableRow is what a test expects of one row of the table.
type tableRow struct {
	label    string // the label's beginning
	baseline bool   // it has a baseline, and so a ratio
	exactly  string // the figure as printed, if it must be exact
}

// The rows of each measurement, in order.
var (
	latencyRows = []tableRow{
		{label: "unary latency p50", baseline: true},
		{label: "unary latency p99", baseline: true},
	}
	throughputRows = []tableRow{
		{label: "unary throughput", baseline: true},
		{label: "CPU per call", baseline: true},
	}
	propagationRows = []tableRow{
		{label: "tunnel open on A → in the directories", baseline: true},
		{label: "the same, max", baseline: true},
		{label: "tunnel open on A → a call through each", baseline: true},
		{label: "the same, max", baseline: true},
	}
	// The revision counts the writes exactly, so these figures are not
	// timings that a busy machine could move: the real path writes one
	// key as a tunnel opens, deletes it as it closes, and writes nothing
	// per call.
	writesRows = []tableRow{
		{label: "etcd writes per tunnel opened", exactly: "1.00"},
		{label: "etcd writes per 1,000 calls", exactly: "0.00"},
		{label: "etcd writes per tunnel closed", exactly: "1.00"},
	}
	memoryRows = []tableRow{
		{label: "heap per directory entry", baseline: true},
	}
)

// TestRun makes every measurement with tiny settings and checks that the
// table has every row, in order, each with a figure (and a ratio where it
// has a baseline), and that a tunnel costs exactly one etcd write to open
// and one to close. Timings are not checked against their targets: on a
// busy machine under -race they say nothing.
func TestRun(t *testing.T) {
	rows := benchRun(t, "-duration", "100ms", "-runs", "1", "-callers", "4", "-entries", "200", "-tunnels", "3")
	var want []tableRow
	for _, rs := range [][]tableRow{latencyRows, throughputRows, propagationRows, writesRows, memoryRows} {
		want = append(want, rs...)
	}
	checkRows(t, rows, want)
}

// TestOnly checks that -only limits the table to the measurements named,
// in the table's order.
func TestOnly(t *testing.T) {
	rows := benchRun(t, "-duration", "50ms", "-runs", "1", "-tunnels", "2", "-only", "writes,latency")
	checkRows(t, rows, append(append([]tableRow{}, latencyRows...), writesRows...))
}

// checkRows checks that rows are the rows of want: the label, a figure
// (above zero unless it must be exact), a baseline and a ratio where there
// is one, and a target's verdict.
func checkRows(t *testing.T, rows [][]string, want []tableRow) {
	t.Helper()
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d: %q", len(rows), len(want), rows)
	}
	for i, cells := range rows {
		w := want[i]
		if !strings.HasPrefix(cells[0], w.label) {
			t.Errorf("row %d is %q, want one starting %q", i, cells[0], w.label)
		}
		if len(cells) != 6 {
			t.Errorf("row %q has %d cells, want 6", cells[0], len(cells))
			continue
		}
		figureCell, baseCell, ratioCell, met := cells[1], cells[2], cells[3], cells[5]
		if w.exactly != "" {
			if figureCell != w.exactly {
				t.Errorf("row %q: figure %q, want %s", cells[0], figureCell, w.exactly)
			}
		} else if v, ok := figure(figureCell); !ok || v <= 0 {
			t.Errorf("row %q: figure %q, want one above zero", cells[0], figureCell)
		}
		if w.baseline {
			if v, ok := figure(baseCell); !ok || v <= 0 {
				t.Errorf("row %q: baseline %q, want one above zero", cells[0], baseCell)
			}
			if !strings.HasSuffix(ratioCell, "×") {
				t.Errorf("row %q: ratio %q, want a ratio", cells[0], ratioCell)
			}
		} else if baseCell != "—" || ratioCell != "—" {
			t.Errorf("row %q: baseline %q and ratio %q, want none", cells[0], baseCell, ratioCell)
		}
		switch met {
		case "yes", "**no**", "—":
		default:
			t.Errorf("row %q: met %q, want yes, **no** or —", cells[0], met)
		}
	}
}

// figure reads the number at the start of a cell such as "1,234 calls/s"
// or "3.2 KiB".
func figure(cell string) (float64, bool) {
	num, _, _ := strings.Cut(cell, " ")
	v, err := strconv.ParseFloat(strings.ReplaceAll(num, ",", ""), 64)
	return v, err == nil
}

func TestParseFlagsRejects(t *testing.T) {
	for _, args := range [][]string{
		{"-only", "latency,nonsense"},
		{"-runs", "0"},
		{"-entries", "0"},
		{"-tunnels", "-1"},
		{"-duration", "0s"},
		{"extra"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded, want an error", args)
		}
	}
}
