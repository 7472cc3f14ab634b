package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"runtime/debug"
	"strings"
)

// runVersion prints which build of grpctunnel this is, so that a bug
// report, or an operator comparing a gateway with its agents, can name the
// exact source and toolchain rather than guess.
func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) int {
	c := newCLI("version", "grpctunnel version",
		"Prints the module version, the commit it was built from (marked\n"+
			"\"modified\" when the tree had uncommitted changes), the commit's time,\n"+
			"and the Go toolchain and platform. grpctunnel --version does the same.",
		stdout, stderr)
	// Every subcommand takes the logging flags, so that a script may pass
	// the same ones to all; version logs nothing.
	addLogFlags(c.fs, slog.LevelInfo)
	if code, ok := c.parse(args); !ok {
		return code
	}
	bi, ok := debug.ReadBuildInfo()
	fmt.Fprintln(stdout, versionLine(bi, ok))
	return 0
}

// versionLine formats what the build info says about this build on one
// line, such as
//
//	grpctunnel v1.2.0 commit 1a2b3c4d5e6f (modified) 2026-12-01T23:00:00Z go1.26.8 linux/amd64
//
// It takes the build info as arguments, so that tests can give it builds
// with and without version control information. A binary built without
// module support (ok false) has none of it; it still reports the Go
// version and platform, which the runtime always knows.
func versionLine(bi *debug.BuildInfo, ok bool) string {
	version := "(unknown version)"
	goVersion := runtime.Version()
	goos, goarch := runtime.GOOS, runtime.GOARCH
	var revision, modified, vcsTime string
	if ok && bi != nil {
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
		if bi.GoVersion != "" {
			goVersion = bi.GoVersion
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				modified = s.Value
			case "vcs.time":
				vcsTime = s.Value
			case "GOOS":
				goos = s.Value
			case "GOARCH":
				goarch = s.Value
			}
		}
	}
	parts := []string{"grpctunnel", version}
	if revision != "" {
		// Twelve hex digits, as in Go's pseudo-versions: short enough to
		// read, long enough to be unique in any one repository.
		parts = append(parts, "commit", revision[:min(len(revision), 12)])
		if modified == "true" {
			parts = append(parts, "(modified)")
		}
		if vcsTime != "" {
			parts = append(parts, vcsTime)
		}
	}
	parts = append(parts, goVersion, goos+"/"+goarch)
	return strings.Join(parts, " ")
}
