package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// propagationSection measures how soon the other replicas route to a
// tunnel that opens on one of them, and returns its rows.
//
// A replica learns of another's tunnel through etcd: the holder writes
// one key in the background as the tunnel opens, and every other replica's
// watch delivers it into its copy of the directory. The floor under that
// is etcd's own: a write, its commit to the log on disk, and its delivery
// to the watchers. So the baseline is a bare Put seen by watches on as many
// other clients, measured in turns with the tunnels.
func propagationSection(ctx context.Context, cfg config, etcd *embedetcd.Server, say func(string, ...any)) []*row {
	const replicas = 3
	n := cfg.tunnels
	hundredMs := atMost(100, formatMillis)
	dirMedian := &row{label: fmt.Sprintf("tunnel open on A → in the directories of B and C, median of %d: vs a bare etcd put → 2 watches ↓", n), format: formatMillis, goal: hundredMs}
	dirMax := &row{label: fmt.Sprintf("the same, max of %d ↓", n), format: formatMillis, goal: hundredMs}
	callMedian := &row{label: fmt.Sprintf("tunnel open on A → a call through each of B and C answered, median of %d: vs the same bare put ↓", n), format: formatMillis, goal: hundredMs}
	callMax := &row{label: fmt.Sprintf("the same, max of %d ↓", n), format: formatMillis, goal: hundredMs}
	rows := []*row{dirMedian, dirMax, callMedian, callMax}
	fail := func(err error) []*row {
		for _, r := range rows {
			r.set(0, err)
			r.setBase(0, err)
		}
		return rows
	}

	say("propagation: %d replicas, %d tunnels opened on replica A one after the other", replicas, n)
	b, err := startBed(ctx, etcd, "bench-propagation", replicas)
	if err != nil {
		return fail(err)
	}
	defer b.close()
	p, err := startPutWatch(ctx, etcd, replicas-1)
	if err != nil {
		return fail(fmt.Errorf("baseline: %w", err))
	}
	defer p.close()

	var dirs, calls, bare []time.Duration
	var tunnelErr, bareErr error
	for i := range n {
		if bareErr == nil {
			var d time.Duration
			if d, bareErr = p.sample(ctx); bareErr == nil {
				bare = append(bare, d)
			}
		}
		if tunnelErr == nil {
			var dir, call time.Duration
			if dir, call, tunnelErr = propagate(ctx, b, "propagation-"+strconv.Itoa(i)); tunnelErr == nil {
				dirs, calls = append(dirs, dir), append(calls, call)
			}
		}
	}
	if tunnelErr != nil {
		tunnelErr = fmt.Errorf("tunnel %d: %w", len(dirs)+1, tunnelErr)
	}
	dirMedian.set(millis(median(dirs)), tunnelErr)
	dirMax.set(millis(longest(dirs)), tunnelErr)
	callMedian.set(millis(median(calls)), tunnelErr)
	callMax.set(millis(longest(calls)), tunnelErr)
	for _, r := range []*row{dirMedian, callMedian} {
		r.setBase(millis(median(bare)), bareErr)
	}
	for _, r := range []*row{dirMax, callMax} {
		r.setBase(millis(longest(bare)), bareErr)
	}
	return rows
}

// propagate opens a tunnel with key on the bed's first replica and
// returns how long it took, from the tunnel's opening, until every other
// replica's directory named the first as a holder of key (dir), and until
// a call for key through each of them had been answered (call). It then
// stops the agent and waits until no directory names key any more, so
// that the next tunnel starts from a quiet cluster.
func propagate(ctx context.Context, b *bed, key string) (dir, call time.Duration, err error) {
	a, others := b.replicas[0], b.replicas[1:]
	waitCtx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	// The others watch before the tunnel opens, so that each notes the
	// moment its directory changes rather than the moment it is asked.
	seen := make([]time.Time, len(others))
	answered := make([]time.Time, len(others))
	errs := make([]error, len(others))
	var wg sync.WaitGroup
	for j, r := range others {
		wg.Go(func() {
			var err error
			if seen[j], err = waitDir(waitCtx, r.dir, func() bool { return r.holds(key, a.id) }); err != nil {
				errs[j] = fmt.Errorf("waiting for %s to see the tunnel on %s: %w", r.id, a.id, err)
				return
			}
			if err := unaryCall(waitCtx, benchkit.Keyed{Conn: r.callers, Key: key}); err != nil {
				errs[j] = fmt.Errorf("a call through %s: %w", r.id, err)
				return
			}
			answered[j] = time.Now()
		})
	}
	agentOpened := make(chan time.Time, 1)
	stop, err := b.startAgent(ctx, a, key, func() {
		select {
		case agentOpened <- time.Now():
		default:
		}
	})
	if err != nil {
		cancel()
		wg.Wait()
		return 0, 0, err
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		stop()
		return 0, 0, err
	}
	// The tunnel opened at the earlier of the moments the gateway and the
	// agent saw it open: the replica records its tunnel as it opens, and
	// the agent is told once the gateway's header has reached it.
	var start time.Time
	select {
	case start = <-agentOpened:
	case <-waitCtx.Done():
	}
	if t, ok := a.openedAt(key); ok && (start.IsZero() || t.Before(start)) {
		start = t
	}
	stop()
	if start.IsZero() {
		return 0, 0, errors.New("neither the gateway nor the agent reported the tunnel open")
	}
	for _, r := range b.replicas {
		if _, err := waitDir(ctx, r.dir, func() bool { return len(r.dir.Holders(key, false)) == 0 }); err != nil {
			return 0, 0, fmt.Errorf("waiting for the closed tunnel to leave %s's directory: %w", r.id, err)
		}
	}
	return slices.MaxFunc(seen, time.Time.Compare).Sub(start), slices.MaxFunc(answered, time.Time.Compare).Sub(start), nil
}

// median is the median of ds (the mean of the middle two for an even
// count), 0 if there are none.
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(ds))
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// longest is the largest of ds, 0 if there are none.
func longest(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	return slices.Max(ds)
}

// putWatchPrefix is where the baseline's keys go, outside every cluster's
// directory.
const putWatchPrefix = "/clusterbench-put-watch/"

// putWatch is the propagation rows' baseline: one etcd client puts a new
// key, and watches on other clients, each as a replica watches its
// directory, deliver it.
type putWatch struct {
	put     *clientv3.Client
	clients []*clientv3.Client
	watches []clientv3.WatchChan
	cancel  context.CancelFunc
	n       int
}

// startPutWatch starts watches on the given number of clients and returns
// once etcd has created them all, so that no put precedes a watch.
func startPutWatch(ctx context.Context, etcd *embedetcd.Server, watches int) (p *putWatch, err error) {
	p = &putWatch{}
	var watchCtx context.Context
	watchCtx, p.cancel = context.WithCancel(ctx)
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	if p.put, err = etcd.Client(); err != nil {
		return nil, err
	}
	for range watches {
		cli, err := etcd.Client()
		if err != nil {
			return nil, err
		}
		p.clients = append(p.clients, cli)
		wch := cli.Watch(watchCtx, putWatchPrefix, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
		select {
		case wr := <-wch:
			if !wr.Created {
				return nil, fmt.Errorf("etcd watch not created: %v", wr.Err())
			}
		case <-time.After(openTimeout):
			return nil, errors.New("etcd watch not created in time")
		}
		p.watches = append(p.watches, wch)
	}
	return p, nil
}

// sample puts a new key and returns how long it took until every watch
// had delivered it.
func (p *putWatch) sample(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	p.n++
	key := putWatchPrefix + strconv.Itoa(p.n)
	start := time.Now()
	if _, err := p.put.Put(ctx, key, ""); err != nil {
		return 0, err
	}
	for _, wch := range p.watches {
		for delivered := false; !delivered; {
			select {
			case wr, ok := <-wch:
				if !ok || wr.Err() != nil {
					return 0, fmt.Errorf("etcd watch ended: %v", wr.Err())
				}
				delivered = slices.ContainsFunc(wr.Events, func(ev *clientv3.Event) bool { return string(ev.Kv.Key) == key })
			case <-ctx.Done():
				return 0, fmt.Errorf("waiting for the watch to deliver the put: %w", ctx.Err())
			}
		}
	}
	return time.Since(start), nil
}

// close stops the watches and closes the clients.
func (p *putWatch) close() {
	p.cancel()
	for _, cli := range p.clients {
		_ = cli.Close()
	}
	if p.put != nil {
		_ = p.put.Close()
	}
}
