package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

// TestVersionLine: each part of the build info lands in its place, and
// what is missing is left out rather than printed empty.
func TestVersionLine(t *testing.T) {
	platform := runtime.GOOS + "/" + runtime.GOARCH
	for _, tc := range []struct {
		name string
		bi   *debug.BuildInfo
		ok   bool
		want string
	}{
		{
			name: "a release built from a clean tree",
			bi: &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v1.2.0"}, Settings: []debug.BuildSetting{
				{Key: "GOOS", Value: "linux"},
				{Key: "GOARCH", Value: "arm64"},
				{Key: "vcs.revision", Value: "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"},
				{Key: "vcs.time", Value: "2026-12-01T23:00:00Z"},
				{Key: "vcs.modified", Value: "false"},
			}},
			ok:   true,
			want: "grpctunnel v1.2.0 commit 1a2b3c4d5e6f 2026-12-01T23:00:00Z go1.26.8 linux/arm64",
		},
		{
			name: "a source build with uncommitted changes",
			bi: &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
				{Key: "vcs.revision", Value: "1a2b3c4"},
				{Key: "vcs.time", Value: "2026-12-01T23:00:00Z"},
				{Key: "vcs.modified", Value: "true"},
			}},
			ok:   true,
			want: "grpctunnel (devel) commit 1a2b3c4 (modified) 2026-12-01T23:00:00Z go1.26.8 " + platform,
		},
		{
			name: "no version control information, as from go run",
			bi:   &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}},
			ok:   true,
			want: "grpctunnel (devel) go1.26.8 " + platform,
		},
		{
			name: "no build info at all",
			ok:   false,
			want: "grpctunnel (unknown version) " + runtime.Version() + " " + platform,
		},
	} {
		if got := versionLine(tc.bi, tc.ok); got != tc.want {
			t.Errorf("%s:\n got %q\nwant %q", tc.name, got, tc.want)
		}
	}
}

// TestVersionCommand: the version command and --version print the same
// single line, on stdout, and exit 0.
func TestVersionCommand(t *testing.T) {
	bi, ok := debug.ReadBuildInfo()
	want := versionLine(bi, ok) + "\n"
	for _, args := range [][]string{{"version"}, {"--version"}, {"-version"}} {
		code, stdout, stderr := runOnce(t, args...)
		if code != 0 || stderr != "" || stdout != want {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want 0, %q and nothing", args, code, stdout, stderr, want)
		}
	}
	code, stdout, stderr := runOnce(t, "version", "extra")
	if code != 2 || stdout != "" || !strings.HasPrefix(stderr, "grpctunnel version: unexpected argument \"extra\"\n") {
		t.Errorf("version extra: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// TestVersionBinary: a built binary reports the build information that
// the Go toolchain stamped into it, as go version -m reads it back, so
// that the command is known to read its own build and not some default.
func TestVersionBinary(t *testing.T) {
	bin := buildCommand(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s --version: %v\n%s", bin, err, out)
	}
	got := string(out)

	//lint:ignore SA1019 the test binary was built by the toolchain that runs it, so its GOROOT is that toolchain's
	goTool := filepath.Join(runtime.GOROOT(), "bin", "go")
	meta, err := exec.CommandContext(ctx, goTool, "version", "-m", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("go version -m: %v\n%s", err, meta)
	}
	want := []string{"grpctunnel "}
	for line := range strings.Lines(string(meta)) {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[0] == "mod":
			want = append(want, "grpctunnel "+f[2]+" ")
		case len(f) == 2 && f[0] == "build":
			key, value, _ := strings.Cut(f[1], "=")
			switch key {
			case "vcs.revision":
				want = append(want, " commit "+value[:min(len(value), 12)]+" ")
			case "vcs.time":
				if _, err := time.Parse(time.RFC3339, value); err != nil {
					t.Errorf("vcs.time %q: %v", value, err)
				}
				want = append(want, " "+value+" ")
			case "vcs.modified":
				if value == "true" {
					want = append(want, " (modified) ")
				} else if strings.Contains(got, "(modified)") {
					t.Errorf("%s --version = %q, but the tree was not modified", bin, got)
				}
			}
		}
	}
	want = append(want, " "+runtime.Version()+" "+runtime.GOOS+"/"+runtime.GOARCH+"\n")
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("%s --version = %q, without %q; go version -m says:\n%s", bin, got, w, meta)
		}
	}
}
