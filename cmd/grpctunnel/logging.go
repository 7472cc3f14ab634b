package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// logFlags are --log-format and --log-level, which every subcommand has.
type logFlags struct {
	format logFormat
	level  logLevel
}

// addLogFlags adds the logging flags to fs, with level as the default level.
func addLogFlags(fs *flag.FlagSet, level slog.Level) *logFlags {
	l := &logFlags{format: "text", level: logLevel(level)}
	fs.Var(&l.format, "log-format", "write the log to standard error as `text|json` lines")
	fs.Var(&l.level, "log-level", "log at `debug|info|warn|error` level and above")
	return l
}

// logger returns a logger writing to w as the flags say.
func (l *logFlags) logger(w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: slog.Level(l.level)}
	if l.format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// logFormat is a flag.Value that accepts only the formats logger knows, so
// that a typo fails on the command line rather than silently logging text.
type logFormat string

// String implements flag.Value.
func (f *logFormat) String() string { return string(*f) }

// Set implements flag.Value.
func (f *logFormat) Set(s string) error {
	switch s {
	case "text", "json":
		*f = logFormat(s)
		return nil
	}
	return fmt.Errorf("want text or json, not %q", s)
}

// logLevel is a flag.Value for the four levels by name.
type logLevel slog.Level

// String implements flag.Value, with the names Set accepts.
func (l *logLevel) String() string { return strings.ToLower(slog.Level(*l).String()) }

// Set implements flag.Value.
func (l *logLevel) Set(s string) error {
	switch s {
	case "debug":
		*l = logLevel(slog.LevelDebug)
	case "info":
		*l = logLevel(slog.LevelInfo)
	case "warn":
		*l = logLevel(slog.LevelWarn)
	case "error":
		*l = logLevel(slog.LevelError)
	default:
		return fmt.Errorf("want debug, info, warn or error, not %q", s)
	}
	return nil
}
