package agent

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/proxy"
)

// watchedConn is what a connection to the service must offer for the
// agent to tell when it is down and when it is back: *grpc.ClientConn
// does.
type watchedConn interface {
	GetState() connectivity.State
	WaitForStateChange(ctx context.Context, from connectivity.State) bool
	Connect()
}

// serviceReach turns the failure to reach the agent's service into a
// status a caller can act on, keeps the detail, which names internal
// addresses, for the agent's log, and follows whether the service can be
// reached: one log line when it becomes unreachable, one when it is back,
// rather than one per failed call.
type serviceReach struct {
	key     string
	conn    watchedConn // nil if the target cannot say its state
	log     *slog.Logger
	metrics *metrics // nil without a Registerer

	failures atomic.Uint64

	mu       sync.Mutex
	down     bool            // since the first failed call, until the connection is ready again
	failedAt uint64          // failures when it went down
	watchCtx context.Context // Run's; nil while the agent is not running
	watchers sync.WaitGroup
}

func newServiceReach(key string, target any, log *slog.Logger, m *metrics) *serviceReach {
	r := &serviceReach{key: key, log: log, metrics: m}
	if c, ok := target.(watchedConn); ok {
		r.conn = c
	}
	m.serviceReachable(true)
	return r
}

// run lets r watch the connection for its return until ctx ends, and
// returns a function that waits for the watcher; Run calls it.
func (r *serviceReach) run(ctx context.Context) (wait func()) {
	r.mu.Lock()
	r.watchCtx = ctx
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		r.watchCtx = nil
		r.mu.Unlock()
		r.watchers.Wait()
	}
}

// rewrite is the proxy's backend error function. An Unavailable status
// while the connection to the service is not ready is the connection's
// failure, not the service's answer: the caller learns that this agent
// cannot reach its service, and the agent logs why. Every other status is
// the service's own and passes unchanged.
func (r *serviceReach) rewrite(_ context.Context, _ proxy.Backend, err error) error {
	if status.Code(err) != codes.Unavailable || r.conn == nil || r.conn.GetState() == connectivity.Ready {
		return nil
	}
	r.failures.Add(1)
	r.metrics.unreachableCall()
	r.wentDown(err)
	return status.Errorf(codes.Unavailable, "grpctunnel agent %s: cannot reach its service; the agent's log says why", errtext.Quote(r.key))
}

// wentDown records a call that failed because the service could not be
// reached; the first of a streak is logged with its cause and starts
// watching for the connection to come back.
func (r *serviceReach) wentDown(err error) {
	r.mu.Lock()
	if r.down {
		r.mu.Unlock()
		return
	}
	r.down = true
	r.failedAt = r.failures.Load() - 1
	ctx := r.watchCtx
	if ctx != nil {
		r.watchers.Add(1)
	}
	r.mu.Unlock()
	r.metrics.serviceReachable(false)
	r.log.Warn("service unreachable: calls fail with Unavailable until it is back", "key", r.key, "err", err)
	if ctx != nil {
		go r.watch(ctx)
	}
}

// watch waits for the connection to the service to be ready again, asking
// an idle one to connect, and then records that the service is back.
func (r *serviceReach) watch(ctx context.Context) {
	defer r.watchers.Done()
	for {
		s := r.conn.GetState()
		switch s {
		case connectivity.Ready:
			r.cameBack()
			return
		case connectivity.Idle:
			r.conn.Connect()
		}
		if !r.conn.WaitForStateChange(ctx, s) {
			return // the agent stopped
		}
	}
}

// cameBack ends a streak of unreachability.
func (r *serviceReach) cameBack() {
	r.mu.Lock()
	r.down = false
	failed := r.failures.Load() - r.failedAt
	r.mu.Unlock()
	r.metrics.serviceReachable(true)
	r.log.Info("service reachable again", "key", r.key, "failed_calls", failed)
}

// reachable reports whether the service was reachable at the last sign:
// true until a call fails for want of it, false until its connection is
// ready again.
func (r *serviceReach) reachable() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return !r.down
}
