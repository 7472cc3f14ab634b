package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives the tests: run
// promises to stop every server, connection, tunnel and relay it started.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// benchRun runs the command with args (tiny settings) and returns the
// table's data rows, each split into its cells.
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
		if !strings.HasPrefix(line, "| ") {
			continue // not a table line, or the header's separator
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		rows = append(rows, cells)
	}
	if len(rows) == 0 {
		t.Fatalf("no table in the output:\n%s", out.String())
	}
	t.Logf("output:\n%s", out.String())
	return rows[1:] // after the header
}

// TestRun runs every measurement with tiny settings and checks that the
// table has every row, each with a figure and a ratio for every target.
func TestRun(t *testing.T) {
	rows := benchRun(t, "-duration", "50ms", "-idle", "20", "-runs", "1")
	// The beginnings of the labels of every row, in order.
	tableRows := []string{
		"unary latency p50",
		"unary latency p99",
		"unary throughput",
		"server-streaming",
		"the same,",
		"heap per idle tunnel",
		"goroutines per idle tunnel",
		"heap per idle stream",
		"goroutines per idle stream",
	}
	if len(rows) != len(tableRows) {
		t.Fatalf("%d rows, want %d: %q", len(rows), len(tableRows), rows)
	}
	for i, cells := range rows {
		if !strings.HasPrefix(cells[0], tableRows[i]) {
			t.Errorf("row %d is %q, want one starting %q", i, cells[0], tableRows[i])
		}
		if len(cells) != 8 {
			t.Errorf("row %q has %d cells, want 8", cells[0], len(cells))
			continue
		}
		for _, c := range cells[1:] {
			if c == "" || c == "error" || c == "n/a" {
				t.Errorf("row %q has a missing figure: %q", cells[0], cells)
				break
			}
		}
		for _, i := range []int{3, 5, 7} {
			if !strings.HasSuffix(cells[i], "×") {
				t.Errorf("row %q: cell %d is %q, want a ratio", cells[0], i, cells[i])
			}
		}
	}
}

// TestOnly checks that -only limits the table to the measurements named.
func TestOnly(t *testing.T) {
	rows := benchRun(t, "-duration", "50ms", "-runs", "1", "-only", "throughput,idle-streams", "-idle", "5")
	var labels []string
	for _, cells := range rows {
		labels = append(labels, cells[0])
	}
	want := []string{"unary throughput", "heap per idle stream", "goroutines per idle stream"}
	if len(labels) != len(want) {
		t.Fatalf("rows %q, want rows starting %q", labels, want)
	}
	for i := range want {
		if !strings.HasPrefix(labels[i], want[i]) {
			t.Fatalf("rows %q, want rows starting %q", labels, want)
		}
	}
}

func TestParseFlagsRejects(t *testing.T) {
	for _, args := range [][]string{
		{"-only", "latency,nonsense"},
		{"-runs", "0"},
		{"-delay", "0s"},
		{"extra"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded, want an error", args)
		}
	}
}
