package agent

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/proxy"
)

// unreachableLogEvery spaces the log lines about an unreachable service, so
// that a busy agent whose service is down logs the fact, not every call.
const unreachableLogEvery = 10 * time.Second

// serviceReach turns the failure to reach the agent's service into a
// status a caller can act on, and keeps the detail, which names internal
// addresses, for the agent's log and count.
type serviceReach struct {
	key   string
	state func() connectivity.State // the target's, if it says
	log   *slog.Logger

	failures atomic.Uint64
	mu       sync.Mutex
	lastLog  time.Time
	unlogged uint64 // failures since the last line
}

func newServiceReach(key string, target any, log *slog.Logger) *serviceReach {
	r := &serviceReach{key: key, log: log}
	if s, ok := target.(interface{ GetState() connectivity.State }); ok {
		r.state = s.GetState
	}
	return r
}

// rewrite is the proxy's backend error function. An Unavailable status
// while the connection to the service is not ready is the connection's
// failure, not the service's answer: the caller learns that this agent
// cannot reach its service, and the agent logs why. Every other status is
// the service's own and passes unchanged.
func (r *serviceReach) rewrite(_ context.Context, _ proxy.Backend, err error) error {
	if status.Code(err) != codes.Unavailable || r.state == nil || r.state() == connectivity.Ready {
		return nil
	}
	r.failures.Add(1)
	r.report(err)
	return status.Errorf(codes.Unavailable, "grpctunnel agent %s: cannot reach its service; the agent's log says why", errtext.Quote(r.key))
}

// report logs err, at most once per unreachableLogEvery, with how many
// calls failed the same way since the last line.
func (r *serviceReach) report(err error) {
	r.mu.Lock()
	r.unlogged++
	now := time.Now()
	if now.Sub(r.lastLog) < unreachableLogEvery {
		r.mu.Unlock()
		return
	}
	n := r.unlogged
	r.unlogged, r.lastLog = 0, now
	r.mu.Unlock()
	r.log.Warn("service unreachable; calls fail with Unavailable", "key", r.key, "err", err, "failed_calls", n, "failed_total", r.failures.Load())
}
