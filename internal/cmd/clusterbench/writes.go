package main

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// writesCalls is how many calls the writes rows make while the tunnels are
// open, to show that calls write nothing.
const writesCalls = 1000

// writesSection counts the etcd writes of tunnels opening and closing on
// a replica, and of calls to them, through the real path: agents opening
// tunnels on a gateway replica, callers calling them through it and
// through another replica, the agents stopping. It returns its rows.
//
// etcd's revision counts its writes, and in this etcd only the bed's
// replicas write meanwhile: a replica's lease keepalives and its probes of
// etcd's health are not writes, and it registered itself before the first
// reading.
func writesSection(ctx context.Context, cfg config, etcd *embedetcd.Server, say func(string, ...any)) []*row {
	n := cfg.tunnels
	perOpen := &row{label: fmt.Sprintf("etcd writes per tunnel opened, %d tunnels on replica A", n), format: formatCount, goal: exactly(1, formatCount)}
	perCall := &row{label: fmt.Sprintf("etcd writes per 1,000 calls, %s calls through A and B", benchkit.Thousands(writesCalls)), format: formatCount, goal: exactly(0, formatCount)}
	perClose := &row{label: fmt.Sprintf("etcd writes per tunnel closed, the same %d", n), format: formatCount, goal: exactly(1, formatCount)}
	rows := []*row{perOpen, perCall, perClose}
	fail := func(from int, err error) []*row {
		for _, r := range rows[from:] {
			r.set(0, err)
		}
		return rows
	}

	say("writes: 2 replicas, %d tunnels opened and closed on replica A", n)
	b, err := startBed(ctx, etcd, "bench-writes", 2)
	if err != nil {
		return fail(0, err)
	}
	defer b.close()
	a, other := b.replicas[0], b.replicas[1]
	before, err := quietRevision(ctx, a.cli)
	if err != nil {
		return fail(0, err)
	}

	// Open: one agent after the other, each waited for until the other
	// replica's directory has its tunnel, hence until its write is done.
	var stops []func()
	defer func() {
		for _, stop := range stops {
			stop()
		}
	}()
	keys := make([]string, n)
	for i := range keys {
		keys[i] = "writes-" + strconv.Itoa(i)
		stop, err := b.startAgent(ctx, a, keys[i], nil)
		if err != nil {
			return fail(0, err)
		}
		stops = append(stops, stop)
		if _, err := waitDir(ctx, other.dir, func() bool { return other.holds(keys[i], a.id) }); err != nil {
			return fail(0, fmt.Errorf("waiting for replica B to see tunnel %d: %w", i+1, err))
		}
	}
	opened, err := quietRevision(ctx, a.cli)
	if err != nil {
		return fail(0, err)
	}
	perOpen.set(float64(opened-before)/float64(n), nil)

	// Calls: half through A, which holds the tunnels, half through B,
	// which forwards them, from the -callers callers at once.
	if err := callAll(ctx, []*replica{a, other}, keys, cfg.callers); err != nil {
		return fail(1, err)
	}
	called, err := quietRevision(ctx, a.cli)
	if err != nil {
		return fail(1, err)
	}
	perCall.set(float64(called-opened)*1000/writesCalls, nil)

	// Close: one agent after the other, each waited for until both
	// directories have forgotten its tunnel, hence until its write is
	// done. Deletes pending together would share one transaction, one
	// revision, and the count would come out below one per tunnel.
	for i, key := range keys {
		stops[i]()
		stops[i] = func() {}
		for _, r := range b.replicas {
			if _, err := waitDir(ctx, r.dir, func() bool { return len(r.dir.Holders(key, false)) == 0 }); err != nil {
				return fail(2, fmt.Errorf("waiting for closed tunnel %d to leave %s's directory: %w", i+1, r.id, err))
			}
		}
	}
	closed, err := quietRevision(ctx, a.cli)
	if err != nil {
		return fail(2, err)
	}
	perClose.set(float64(closed-called)/float64(n), nil)
	return rows
}

// callAll makes writesCalls calls from callers callers at once, each
// through the next of via in turn and to the next of keys, and returns the
// first error.
func callAll(ctx context.Context, via []*replica, keys []string, callers int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next atomic.Int64
	errs := make(chan error, callers)
	for range callers {
		go func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= writesCalls {
					errs <- nil
					return
				}
				r := via[i%len(via)]
				if err := unaryCall(ctx, benchkit.Keyed{Conn: r.callers, Key: keys[i%len(keys)]}); err != nil {
					cancel()
					errs <- fmt.Errorf("a call through %s: %w", r.id, err)
					return
				}
			}
		}()
	}
	var first error
	for range callers {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// quietRevision returns etcd's revision once it has stopped moving for a
// while, so that a write made a little after the change it belongs to
// (one sent in the background, or a second one that should not be there)
// is counted with that change.
func quietRevision(ctx context.Context, cli *clientv3.Client) (int64, error) {
	const (
		poll      = 20 * time.Millisecond
		steadyFor = 10 // polls: 200 ms without a write
	)
	rev, err := revision(ctx, cli)
	if err != nil {
		return 0, err
	}
	for steady, deadline := 0, time.Now().Add(openTimeout); steady < steadyFor; {
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("etcd's revision still moving after %v", openTimeout)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(poll):
		}
		next, err := revision(ctx, cli)
		if err != nil {
			return 0, err
		}
		if next == rev {
			steady++
		} else {
			rev, steady = next, 0
		}
	}
	return rev, nil
}
