package gateway

import (
	"context"
	"log/slog"
	"strings"

	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// AccessLogMessage is the message of every access log line, so that a log
// shared with the gateway's other lines can be filtered for them.
const AccessLogMessage = "call"

// maxLoggedName bounds the method and key a line repeats: both are the
// caller's to choose, and no real method or agent key is this long.
const maxLoggedName = maxKeyLen

// accessLog writes Options.AccessLog's lines.
type accessLog struct {
	log *slog.Logger
}

// write logs the call st that ended with end: one line at info level
// holding only what the caller chose bounded. Its attributes are built on
// the stack; the line itself, the peer's address and identity as text,
// are all it allocates.
func (a *accessLog) write(ctx context.Context, st *callState, end *stats.End) {
	if !a.log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	code := status.Code(end.Error)
	remote := ""
	if st.remote != nil {
		remote = st.remote.String()
	}
	identityAttr := slog.Attr{}
	if p, ok := peer.FromContext(ctx); ok {
		if id := identity(p.AuthInfo); id != "" {
			identityAttr = slog.String("identity", id)
		}
	}
	a.log.LogAttrs(ctx, slog.LevelInfo, AccessLogMessage,
		slog.String("method", bounded(st.method, maxLoggedName)),
		slog.String("key", st.key),
		slog.String("code", code.String()),
		slog.Float64("duration_ms", float64(end.EndTime.Sub(end.BeginTime).Microseconds())/1000),
		slog.Int64("req_bytes", st.in.Load()),
		slog.Int64("resp_bytes", st.out.Load()),
		slog.String("peer", remote),
		identityAttr, // an empty Attr is left out
	)
}

// keyField is the access log's key for the values of the key header: the
// one key most calls name, or the keys of a fan-out as the caller listed
// them, bounded either way.
func keyField(values []string) string {
	switch len(values) {
	case 0:
		return ""
	case 1:
		return bounded(strings.TrimSpace(values[0]), maxLoggedName)
	}
	return bounded(strings.Join(values, ","), maxLoggedName)
}
