package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
)

// writeMachine prints what the figures were measured on, since they mean
// little without it: the platform, the CPUs, and the Go, gRPC and etcd
// versions.
func writeMachine(w io.Writer) {
	fmt.Fprintf(w, "- machine: %s/%s, %d CPUs, GOMAXPROCS %d", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.GOMAXPROCS(0))
	if m := cpuModel(); m != "" {
		fmt.Fprintf(w, ", %s", m)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "- Go: %s", runtime.Version())
	for _, m := range []struct{ name, path string }{
		{"gRPC-Go", "google.golang.org/grpc"},
		{"etcd", "go.etcd.io/etcd/server/v3"},
	} {
		if v := moduleVersion(m.path); v != "" {
			fmt.Fprintf(w, ", %s %s", m.name, v)
		}
	}
	fmt.Fprintln(w)
}

// cpuModel returns the CPU's model name as Linux reports it, or "" where
// that is not available.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(key) == "model name" {
			return strings.Join(strings.Fields(value), " ")
		}
	}
	return ""
}

// moduleVersion returns the version of module path built into this binary,
// or "" if unknown.
func moduleVersion(path string) string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	for _, dep := range info.Deps {
		if dep.Path == path {
			if dep.Replace != nil {
				return dep.Replace.Version
			}
			return dep.Version
		}
	}
	return ""
}
