package benchkit

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
)

// Module is a dependency whose version a table names.
type Module struct {
	Name string // as printed, "gRPC-Go"
	Path string // the module path, "google.golang.org/grpc"
}

// GRPC is gRPC-Go, which every table of the project's benches names.
var GRPC = Module{Name: "gRPC-Go", Path: "google.golang.org/grpc"}

// WriteMachine prints what the figures were measured on, since they mean
// little without it: the platform, the CPUs, and the versions of Go and of
// modules built into this binary.
func WriteMachine(w io.Writer, modules ...Module) {
	fmt.Fprintf(w, "- machine: %s/%s, %d CPUs, GOMAXPROCS %d", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.GOMAXPROCS(0))
	if m := cpuModel(); m != "" {
		fmt.Fprintf(w, ", %s", m)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "- Go: %s", runtime.Version())
	for _, m := range modules {
		if v := moduleVersion(m.Path); v != "" {
			fmt.Fprintf(w, ", %s %s", m.Name, v)
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
