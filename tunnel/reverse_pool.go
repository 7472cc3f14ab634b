package tunnel

import (
	"context"
	"reflect"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
)

// tunnelPool holds a handler's open reverse tunnels, grouped by affinity key,
// and picks among them: the least loaded with room, round-robin among
// equals.
type tunnelPool struct {
	mu      sync.Mutex
	all     []*tunnelClient
	next    int
	byKey   map[any]*keyGroup
	keys    map[*tunnelClient]any
	changed chan struct{} // closed and replaced whenever a tunnel is added
}

type keyGroup struct {
	tunnels []*tunnelClient
	next    int
}

func newTunnelPool() *tunnelPool {
	return &tunnelPool{
		byKey:   map[any]*keyGroup{},
		keys:    map[*tunnelClient]any{},
		changed: make(chan struct{}),
	}
}

// add puts an open tunnel in the pool. It returns errPoolClosed, without
// adding it, if the tunnel has already ended, so a tunnel never enters the
// pool after it left; and errTooManyForKey if its key already has perKey
// tunnels.
func (p *tunnelPool) add(t *tunnelClient, key any, perKey int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	t.mu.Lock()
	closed := t.state == endClosed
	t.mu.Unlock()
	if closed {
		return errPoolClosed
	}
	g := p.byKey[key]
	if g != nil && len(g.tunnels) >= perKey {
		return errTooManyForKey
	}
	if g == nil {
		g = &keyGroup{}
		p.byKey[key] = g
	}
	p.all = append(p.all, t)
	g.tunnels = append(g.tunnels, t)
	p.keys[t] = key
	close(p.changed)
	p.changed = make(chan struct{})
	return nil
}

// size reports how many tunnels the pool holds.
func (p *tunnelPool) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.all)
}

// remove takes a tunnel out of the pool; it is a no-op for one not in it.
func (p *tunnelPool) remove(t *tunnelClient) {
	p.mu.Lock()
	defer p.mu.Unlock()
	key, ok := p.keys[t]
	if !ok {
		return
	}
	delete(p.keys, t)
	p.all = without(p.all, t)
	if g := p.byKey[key]; g != nil {
		g.tunnels = without(g.tunnels, t)
		if len(g.tunnels) == 0 {
			delete(p.byKey, key)
		}
	}
}

func without(ts []*tunnelClient, t *tunnelClient) []*tunnelClient {
	for i := range ts {
		if ts[i] == t {
			return append(ts[:i:i], ts[i+1:]...)
		}
	}
	return ts
}

// snapshot returns every tunnel in the pool, in the order they opened.
func (p *tunnelPool) snapshot() []TunnelChannel {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]TunnelChannel, len(p.all))
	for i, t := range p.all {
		out[i] = t
	}
	return out
}

// pickScan bounds how many tunnels with room pick compares: enough to find
// a lightly loaded one among the tunnels of an agent or a few, without
// walking thousands on every call of a channel over all of them.
const pickScan = 8

// pick returns the tunnel for the next call among every tunnel (all) or
// those with key: of the tunnels with room for a call, the one carrying the
// fewest, the next one round-robin among equals. Tunnels that are draining,
// ending or at their limit of calls are passed over, so that a call never
// lands on a full tunnel while another has room. With no tunnel at all it
// returns nil and a channel closed when one is added, and so it does when
// every tunnel is draining; when some are only full, it returns nil and
// busy.
func (p *tunnelPool) pick(all bool, key any) (t *tunnelClient, busy bool, changed <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ts, next := p.group(all, key)
	if len(ts) == 0 {
		return nil, false, p.changed
	}
	best, bestLoad, seen := -1, 0, 0
	for i := range ts {
		j := (*next + 1 + i) % len(ts)
		load, ok := ts[j].room()
		if !ok {
			busy = busy || load > 0 && !ts[j].refusing.Load()
			continue
		}
		if best < 0 || load < bestLoad {
			best, bestLoad = j, load
		}
		if seen++; load == 0 || seen == pickScan {
			break
		}
	}
	if best < 0 {
		return nil, busy, p.changed
	}
	*next = best
	return ts[best], false, nil
}

// usable reports, without moving the round-robin cursor, whether a call
// could be picked a tunnel now; see pick.
func (p *tunnelPool) usable(all bool, key any) (ok bool, changed <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ts, _ := p.group(all, key)
	for _, t := range ts {
		if _, ok := t.room(); ok {
			return true, nil
		}
	}
	return false, p.changed
}

// group returns the tunnels a channel picks among, and its cursor; mu held.
func (p *tunnelPool) group(all bool, key any) ([]*tunnelClient, *int) {
	if all {
		return p.all, &p.next
	}
	if !comparable(key) {
		return nil, nil // no tunnel can have such a key
	}
	g := p.byKey[key]
	if g == nil {
		return nil, nil
	}
	return g.tunnels, &g.next
}

// ReverseClientConnInterface is a channel over a set of reverse tunnels.
// Each call goes to the tunnel of the set with the fewest calls in progress
// that has room for one more, round-robin among equals. A call that never
// left this end because its tunnel was ending or full at that moment is
// tried on another tunnel of the set, as gRPC retries a call that never
// left the client. With no tunnel in the set a call fails with
// Unavailable, or, with grpc.WaitForReady(true), waits for one; when every
// tunnel of the set is at its limit of calls it fails with
// ResourceExhausted.
type ReverseClientConnInterface interface {
	grpc.ClientConnInterface

	// Ready reports whether the set has a tunnel that takes calls now. It
	// does not count as a call: it leaves the round-robin order alone.
	Ready() bool
	// WaitForReady blocks until Ready would report true, or until ctx is
	// done, in which case it returns ctx's error.
	WaitForReady(ctx context.Context) error
}

type reverseChannel struct {
	pool *tunnelPool
	all  bool
	key  any
}

func (c reverseChannel) Ready() bool {
	ok, _ := c.pool.usable(c.all, c.key)
	return ok
}

func (c reverseChannel) WaitForReady(ctx context.Context) error {
	for {
		ok, changed := c.pool.usable(c.all, c.key)
		if ok {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// maxAttempts bounds how often a call that never left is tried again on
// another tunnel: each failed attempt takes its tunnel out of the running
// (it is ending, draining or full), so a few are enough.
const maxAttempts = 4

func (c reverseChannel) choose(ctx context.Context, opts []grpc.CallOption) (*tunnelClient, error) {
	wait := false
	for _, o := range opts {
		if ff, ok := o.(grpc.FailFastCallOption); ok {
			wait = !ff.FailFast
		}
	}
	for {
		t, busy, changed := c.pool.pick(c.all, c.key)
		switch {
		case t != nil:
			return t, nil
		case busy:
			return nil, errAllReverseBusy(c.forKey())
		case !wait:
			return nil, errNoReverseTunnel(c.forKey())
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
}

// forKey names the channel's key in error messages.
func (c reverseChannel) forKey() string {
	if c.all {
		return ""
	}
	return " for key " + errtext.QuoteAny(c.key)
}

func (c reverseChannel) Invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	for attempt := 1; ; attempt++ {
		t, err := c.choose(ctx, opts)
		if err != nil {
			return err
		}
		err = t.invoke(ctx, method, req, reply, opts...)
		if attempt == maxAttempts || !neverLeft(err) {
			return err
		}
	}
}

func (c reverseChannel) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	for attempt := 1; ; attempt++ {
		t, err := c.choose(ctx, opts)
		if err != nil {
			return nil, err
		}
		cs, err := t.openStream(ctx, desc, method, opts...)
		if attempt == maxAttempts || !neverLeft(err) {
			return cs, err
		}
	}
}

// comparable reports whether key can index a map without panicking.
func comparable(key any) bool {
	if key == nil {
		return true
	}
	return reflect.ValueOf(key).Comparable()
}
