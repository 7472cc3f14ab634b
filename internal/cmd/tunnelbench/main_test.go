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
// promises to stop every server, connection, tunnel and relay it started.
//
// The gateway's memory rows run this binary again as a child server (see
// child.go); in tests that binary is the test binary, so TestMain serves as
// the child when asked to, as main does.
func TestMain(m *testing.M) {
	if kind, ok := os.LookupEnv(childEnv); ok {
		if err := serveChild(kind, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "tunnelbench child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// benchRun runs the command with args (tiny settings) and returns the
// data rows of its tables, each split into its cells.
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
			continue // not a table line, a header or a header's separator
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
	return rows
}

// The beginnings of the labels of every row of each table, in order.
var (
	tunnelTableRows = []string{
		"unary latency p50",
		"unary latency p99",
		"unary throughput",
		"server-streaming",
		"server-streaming 1 KiB messages, one stream",
		"server-streaming",
		"heap per idle tunnel",
		"goroutines per idle tunnel",
		"heap per idle stream",
		"goroutines per idle stream",
	}
	gatewayTableRows = []string{
		"unary latency p50",
		"unary latency p99",
		"unary throughput, 32 callers ↑",
		"CPU per call, 32 callers",
		"one stream, 1 MiB messages",
		"one stream, 1 KiB messages ↑",
		"one stream, 1 KiB messages, 10ms one-way delay on the agent hop",
		"unary throughput, 32 callers, 10ms one-way delay on the agent hop",
		"server RSS per connected agent",
		"server heap in use per connected agent",
		"server goroutines per connected agent",
	}
)

// TestRun runs every measurement with tiny settings and checks that both
// tables have every row, each with a figure above zero and a ratio for
// every target.
func TestRun(t *testing.T) {
	rows := benchRun(t, "-duration", "50ms", "-idle", "20", "-runs", "1")
	if want := len(tunnelTableRows) + len(gatewayTableRows); len(rows) != want {
		t.Fatalf("%d rows, want %d: %q", len(rows), want, rows)
	}
	checkRows(t, rows[:len(tunnelTableRows)], tunnelTableRows, len(tunnelTargets))
	checkRows(t, rows[len(tunnelTableRows):], gatewayTableRows, len(gatewayTargets))
}

// TestGateway runs each gateway measurement alone, as -only selects it.
func TestGateway(t *testing.T) {
	for _, tc := range []struct {
		key  string
		rows []string // of gatewayTableRows
	}{
		{keyGatewayLatency, gatewayTableRows[0:2]},
		{keyGatewayThroughput, gatewayTableRows[2:4]},
		{keyGatewayStream, gatewayTableRows[4:6]},
		{keyGatewayDelay, gatewayTableRows[6:8]},
		{keyGatewayMemory, gatewayTableRows[8:11]},
	} {
		t.Run(tc.key, func(t *testing.T) {
			rows := benchRun(t, "-duration", "50ms", "-runs", "1", "-idle", "20", "-only", tc.key)
			if len(rows) != len(tc.rows) {
				t.Fatalf("%d rows, want %d: %q", len(rows), len(tc.rows), rows)
			}
			checkRows(t, rows, tc.rows, len(gatewayTargets))
		})
	}
}

// checkRows checks that each of rows starts with its label in labels, and
// has a figure above zero for each of targets and a ratio for each but the
// first.
func checkRows(t *testing.T, rows [][]string, labels []string, targets int) {
	t.Helper()
	for i, cells := range rows {
		if !strings.HasPrefix(cells[0], labels[i]) {
			t.Errorf("row %d is %q, want one starting %q", i, cells[0], labels[i])
		}
		if want := 2 * targets; len(cells) != want {
			t.Errorf("row %q has %d cells, want %d", cells[0], len(cells), want)
			continue
		}
		for j := 1; j < len(cells); j++ {
			c := cells[j]
			if j > 1 && j%2 == 1 { // a ratio
				if !strings.HasSuffix(c, "×") {
					t.Errorf("row %q: cell %d is %q, want a ratio", cells[0], j, c)
				}
				continue
			}
			if v, ok := figure(c); !ok || v <= 0 {
				t.Errorf("row %q: cell %d is %q, want a figure above zero", cells[0], j, c)
			}
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
		{"-only", "gateway"},
		{"-delay", "0s"},
		{"extra"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded, want an error", args)
		}
	}
}
