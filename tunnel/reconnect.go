package tunnel

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
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
	// Header is the response header of the opening RPC, on TunnelOpen and
	// in the change given to ReconnectOptions.Admit; nil otherwise. A
	// server tells its client there what the client may want to know about
	// the tunnel it accepted: a replica of grpctunnel's gateway, one of
	// several behind the client's addresses, names itself in it, so that
	// the client can tell where each of its tunnels landed. It is shared
	// with every observer: do not modify it.
	Header metadata.MD
	// GiveBack, set on TunnelOpen, gives this tunnel back as
	// ReconnectOptions.Admit does, for a client that learns later that the
	// tunnel would be better elsewhere: the tunnel is drained as
	// GracefulStop drains it (the server starts no new call on it and the
	// calls in progress finish), reported as TunnelWaiting with an Err
	// that wraps ErrGivenBack and reason, and opened again after a short
	// delay. It may be called from any goroutine and more than once; once
	// the tunnel has ended it does nothing.
	GiveBack func(reason error)
}

// ReconnectOptions configure ServeWithReconnect.
type ReconnectOptions struct {
	// Tunnels is how many tunnels to keep open (1 if zero).
	Tunnels int
	// MinBackoff is the first delay before a new attempt (100 ms if zero).
	// Each consecutive failure doubles it, up to MaxBackoff, and the delay
	// actually used is drawn at random below it ("full jitter"), so that
	// many clients cut off at once do not come back at once. A server that
	// restarts is treated apart (see ServeWithReconnect): the delay then
	// stays below four times MinBackoff.
	MinBackoff time.Duration
	// MaxBackoff caps the delay (30 s if zero). A tunnel that stayed open
	// at least this long counts as healthy: after it ends, the backoff
	// starts again from MinBackoff.
	MaxBackoff time.Duration
	// OnStateChange, if set, is called on every change of every tunnel,
	// from the tunnel's own goroutine; it must not block for long. It
	// learns of an open tunnel before the tunnel serves its first call.
	OnStateChange func(StateChange)
	// Admit, if set, is asked about every tunnel that opens, before the
	// tunnel serves any call, with the change that would report it open
	// (Tunnel, State TunnelOpen, Header). Returning nil admits the tunnel,
	// which is then reported open. Returning an error gives the tunnel
	// back at once, so that its next opening RPC may land elsewhere: where
	// the address dialled balances over several servers, a client can
	// choose which of them hold its tunnels (see StateChange.Header). The
	// tunnel is drained rather than cut, so the server learns straight
	// away to start no call on it and a call it started before that is
	// still served; it is reported as TunnelWaiting with an Err that wraps
	// ErrGivenBack and the error returned, never as open, and opened again
	// after a delay drawn below MinBackoff for the first refusal, doubling
	// with each further one in a row up to four times MinBackoff. A refusal
	// is not a failure: it leaves the backoff of failures as it was. Admit
	// is called from the tunnel's own goroutine, concurrently for different
	// tunnels, and must not block for long; it should not refuse without
	// end, since each refusal costs an opening RPC.
	Admit func(StateChange) error
	// CallOptions apply to every opening RPC (credentials, for instance).
	CallOptions []grpc.CallOption

	// rand and now, when set, replace the random draw of the delays and
	// the clock, for tests.
	rand func(n int64) int64
	now  func() time.Time
}

// restartWindow is how long after a server signals that it is going away
// (it ends a tunnel cleanly, or refuses one because it is shutting down) a
// failure to reach it is taken for the server restarting rather than for
// an outage: long enough to cover a drain of half a minute and a restart.
const restartWindow = time.Minute

// restartCapFactor sets the cap of the delay while a server restarts, as a
// multiple of MinBackoff (400 ms by default).
const restartCapFactor = 4

// ServeWithReconnect keeps opts.Tunnels reverse tunnels open until ctx is done
// or the server is stopped, opening each again with capped, jittered,
// exponential backoff whenever it cannot open or ends. It is what a client
// behind NAT runs for its whole life. It returns nil once the server is
// stopped, and ctx's error if ctx ended it. ctx's outgoing metadata goes
// with every opening RPC, as with Serve.
//
// A server that goes away gracefully is not failing, and its clients should
// be back as soon as it, or another server at the same address, takes
// tunnels again:
//
//   - When the server ends a tunnel cleanly (it is draining, as
//     TunnelServiceHandler.InitiateShutdown makes it), the backoff starts
//     again from MinBackoff and the tunnel is reopened after a delay drawn
//     below MinBackoff. Where several servers share the address, that is
//     how the client moves to another one at once.
//   - A refusal because the server is shutting down (Unavailable, "server
//     is shutting down"), and for a minute after such a refusal or a clean
//     end any failure to reach the server (Unavailable), are taken for a
//     restart in progress: the delay still doubles from MinBackoff, but
//     only up to four times MinBackoff (400 ms by default, never more than
//     MaxBackoff). A lone server that restarts has its clients back within
//     that much of listening again, and one that keeps refusing while it
//     drains gets a few attempts a second from each tunnel, not a flood.
//   - A tunnel the server ends cleanly less than that cap after it opened
//     counts as such a refusal, not as a fresh start, so that a server that
//     closes every tunnel at once is not reopened in a tight loop.
//
// Any other failure, and a failure to reach the server once that minute
// has passed or a tunnel has opened again, backs off exponentially up to
// MaxBackoff. A tunnel the client gives back itself (ReconnectOptions.Admit,
// StateChange.GiveBack) is no failure and is reopened quickly.
//
// The gRPC connection under the tunnels has a backoff of its own, which
// grows to two minutes and meanwhile fails every opening RPC at once. Dial
// the server with a short idle timeout (grpc.WithIdleTimeout, 10 ms say):
// the connection then forgets that backoff whenever no tunnel is open or
// opening, and the delays above alone pace the attempts.
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
	b := backoff{min: opts.MinBackoff, max: opts.MaxBackoff, rand: opts.rand, now: opts.now}
	b.init()
	for {
		report(StateChange{State: TunnelConnecting})
		var openedAt time.Time
		started, err := s.serve(ctx, func(hdr metadata.MD, giveBack func(error)) error {
			openedAt = b.now()
			b.opened()
			c := StateChange{Tunnel: slot, State: TunnelOpen, Header: hdr}
			if opts.Admit != nil {
				if err := opts.Admit(c); err != nil {
					return err
				}
			}
			b.admitted()
			c.GiveBack = giveBack
			report(c)
			return nil
		}, opts.CallOptions)
		if errors.Is(err, ErrServerStopped) || s.isStopped() || ctx.Err() != nil {
			report(StateChange{State: TunnelStopped, Err: ignoreStop(err, ctx)})
			return
		}
		var lived time.Duration
		if started {
			lived = b.now().Sub(openedAt)
		}
		var delay time.Duration
		if started && errors.Is(err, ErrGivenBack) {
			delay = b.givenBack(lived)
		} else {
			delay = b.after(started, lived, err)
		}
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

// backoff computes capped exponential delays with full jitter, held below
// a small cap while the server restarts.
type backoff struct {
	min, max   time.Duration
	restartCap time.Duration // the cap while the server restarts
	ceiling    time.Duration // the current cap of the random draw
	// restartUntil is when failures to reach the server stop being taken
	// for a restart; zero when no restart is under way.
	restartUntil time.Time
	// quick is the ceiling of the delay after the client gives a tunnel
	// back; zero until it does, and again once a tunnel is admitted.
	quick time.Duration
	rand  func(n int64) int64
	now   func() time.Time
}

func (b *backoff) init() {
	if b.min <= 0 {
		b.min = 100 * time.Millisecond
	}
	if b.max <= 0 {
		b.max = 30 * time.Second
	}
	b.max = max(b.max, b.min)
	b.restartCap = min(restartCapFactor*b.min, b.max)
	if b.rand == nil {
		b.rand = rand.Int64N
	}
	if b.now == nil {
		b.now = time.Now
	}
	b.reset()
}

func (b *backoff) reset() { b.ceiling = b.min }

// opened notes that a tunnel opened: the server is back, whatever it went
// through.
func (b *backoff) opened() { b.restartUntil = time.Time{} }

// admitted notes that the client kept a tunnel that opened: the next one
// it gives back is reopened after the shortest delay again.
func (b *backoff) admitted() { b.quick = 0 }

// givenBack returns the delay after the client gave back a tunnel that had
// been open for lived. The server took the tunnel, so this is no failure:
// the delay is drawn below MinBackoff, and the ceiling doubles only while
// the client keeps giving tunnels back without keeping one, up to the
// restart cap, so that a client that refuses every tunnel costs the server
// a few opening RPCs a second rather than a loop. A tunnel that lived as
// long as a healthy one resets the backoff of failures too.
func (b *backoff) givenBack(lived time.Duration) time.Duration {
	if lived >= b.max {
		b.reset()
	}
	if b.quick == 0 {
		b.quick = b.min
	}
	d := time.Duration(b.rand(int64(b.quick) + 1))
	b.quick = min(2*b.quick, b.restartCap)
	return d
}

// after returns the delay before the next attempt, given how the last one
// ended: started says whether the tunnel opened, lived how long it stayed
// open, and err why it ended (nil for a clean end).
func (b *backoff) after(started bool, lived time.Duration, err error) time.Duration {
	now := b.now()
	switch {
	case started && err == nil:
		// The server drained the tunnel: it is going away.
		b.restartUntil = now.Add(restartWindow)
		if lived >= b.restartCap {
			b.reset()
		}
		return b.nextRestart()
	case !started && refusedAsShuttingDown(err):
		b.restartUntil = now.Add(restartWindow)
		return b.nextRestart()
	case status.Code(err) == codes.Unavailable && now.Before(b.restartUntil):
		return b.nextRestart()
	}
	if started && lived >= b.max {
		b.reset()
	}
	return b.next()
}

// next returns a delay drawn from [0, ceiling] and doubles the ceiling, up
// to max.
func (b *backoff) next() time.Duration {
	d := time.Duration(b.rand(int64(b.ceiling) + 1))
	b.ceiling = min(2*b.ceiling, b.max)
	return d
}

// nextRestart is next while the server restarts: the ceiling is brought
// down to restartCap if it was higher, and grows no further.
func (b *backoff) nextRestart() time.Duration {
	b.ceiling = min(b.ceiling, b.restartCap)
	d := time.Duration(b.rand(int64(b.ceiling) + 1))
	b.ceiling = min(2*b.ceiling, b.restartCap)
	return d
}

// refusedAsShuttingDown reports whether err is a TunnelServiceHandler's
// refusal of a new tunnel because it is shutting down.
func refusedAsShuttingDown(err error) bool {
	s, ok := status.FromError(err)
	return ok && s.Code() == codes.Unavailable && s.Message() == shuttingDownMessage
}
