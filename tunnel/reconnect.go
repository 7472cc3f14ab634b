package tunnel

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc"
)

// TunnelState is where one of the tunnels kept by ServeWithReconnect stands.
type TunnelState int

const (
	// TunnelConnecting: the tunnel is being opened.
	TunnelConnecting TunnelState = iota
	// TunnelOpen: the tunnel is open and serving calls.
	TunnelOpen
	// TunnelWaiting: the tunnel failed or ended and will be opened again
	// after a delay.
	TunnelWaiting
	// TunnelStopped: the tunnel will not be opened again; the context is
	// done or the server was stopped.
	TunnelStopped
)

func (s TunnelState) String() string {
	switch s {
	case TunnelConnecting:
		return "connecting"
	case TunnelOpen:
		return "open"
	case TunnelWaiting:
		return "waiting"
	case TunnelStopped:
		return "stopped"
	}
	return "unknown"
}

// StateChange reports that one of the kept tunnels changed state.
type StateChange struct {
	// Tunnel numbers the tunnel, from 0 to ReconnectOptions.Tunnels-1.
	Tunnel int
	// State is the new state.
	State TunnelState
	// Err is why the tunnel's last attempt or life ended, when it failed;
	// nil on a clean end.
	Err error
	// Delay is how long the tunnel waits before the next attempt, in
	// TunnelWaiting.
	Delay time.Duration
}

// ReconnectOptions configure ServeWithReconnect.
type ReconnectOptions struct {
	// Tunnels is how many tunnels to keep open (1 if zero).
	Tunnels int
	// MinBackoff is the first delay before a new attempt (100 ms if zero).
	// Each consecutive failure doubles it, up to MaxBackoff, and the delay
	// actually used is drawn at random below it ("full jitter"), so that
	// many clients cut off at once do not come back at once.
	MinBackoff time.Duration
	// MaxBackoff caps the delay (30 s if zero). A tunnel that stayed open
	// at least this long counts as healthy: after it ends, the backoff
	// starts again from MinBackoff.
	MaxBackoff time.Duration
	// OnStateChange, if set, is called on every change of every tunnel,
	// from the tunnel's own goroutine; it must not block for long.
	OnStateChange func(StateChange)
	// CallOptions apply to every opening RPC (credentials, for instance).
	CallOptions []grpc.CallOption
}

// ServeWithReconnect keeps opts.Tunnels reverse tunnels open until ctx is done
// or the server is stopped, opening each again with capped, jittered,
// exponential backoff whenever it cannot open or ends. It is what a client
// behind NAT runs for its whole life. It returns nil once the server is
// stopped, and ctx's error if ctx ended it. ctx's outgoing metadata goes
// with every opening RPC, as with Serve.
func (s *ReverseTunnelServer) ServeWithReconnect(ctx context.Context, opts ReconnectOptions) error {
	n := max(opts.Tunnels, 1)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { s.keep(ctx, i, opts) })
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	return nil
}

// keep runs one tunnel slot until ctx is done or the server stops.
func (s *ReverseTunnelServer) keep(ctx context.Context, slot int, opts ReconnectOptions) {
	report := func(c StateChange) {
		if opts.OnStateChange != nil {
			c.Tunnel = slot
			opts.OnStateChange(c)
		}
	}
	b := backoff{min: opts.MinBackoff, max: opts.MaxBackoff}
	b.init()
	for {
		report(StateChange{State: TunnelConnecting})
		var openedAt time.Time
		started, err := s.serve(ctx, func() {
			openedAt = time.Now()
			report(StateChange{State: TunnelOpen})
		}, opts.CallOptions)
		if errors.Is(err, ErrServerStopped) || s.isStopped() || ctx.Err() != nil {
			report(StateChange{State: TunnelStopped, Err: ignoreStop(err, ctx)})
			return
		}
		if started && time.Since(openedAt) >= b.max {
			b.reset()
		}
		delay := b.next()
		report(StateChange{State: TunnelWaiting, Err: err, Delay: delay})
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			report(StateChange{State: TunnelStopped, Err: ctx.Err()})
			return
		case <-s.stopping:
			t.Stop()
			report(StateChange{State: TunnelStopped})
			return
		}
	}
}

// ignoreStop keeps only a failure worth reporting as the reason a tunnel
// stopped: not the stop itself.
func ignoreStop(err error, ctx context.Context) error {
	if errors.Is(err, ErrServerStopped) {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

func (s *ReverseTunnelServer) isStopped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopped
}

// backoff computes capped exponential delays with full jitter.
type backoff struct {
	min, max time.Duration
	ceiling  time.Duration // the current cap of the random draw
	rand     func(n int64) int64
}

func (b *backoff) init() {
	if b.min <= 0 {
		b.min = 100 * time.Millisecond
	}
	if b.max <= 0 {
		b.max = 30 * time.Second
	}
	b.max = max(b.max, b.min)
	if b.rand == nil {
		b.rand = rand.Int64N
	}
	b.reset()
}

func (b *backoff) reset() { b.ceiling = b.min }

// next returns a delay drawn from [0, ceiling] and doubles the ceiling, up
// to max.
func (b *backoff) next() time.Duration {
	d := time.Duration(b.rand(int64(b.ceiling) + 1))
	b.ceiling = min(2*b.ceiling, b.max)
	return d
}
