package tunnel

import (
	"context"
	"errors"
	"reflect"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tunnelPool holds a handler's open reverse tunnels, grouped by affinity key,
// and picks among them round-robin.
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
	closed := t.closed
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

var (
	errPoolClosed    = errors.New("grpctunnel: tunnel ended before it joined the pool")
	errTooManyForKey = status.Error(codes.ResourceExhausted, "grpctunnel: too many reverse tunnels for this affinity key (see MaxReverseTunnelsPerKey)")
)

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

// pick returns the next usable tunnel, round-robin, or nil. With all it
// picks among every tunnel, otherwise among those with key.
func (p *tunnelPool) pick(all bool, key any) (*tunnelClient, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ts, next := p.all, &p.next
	if !all {
		if !comparable(key) {
			return nil, p.changed // no tunnel can have such a key
		}
		g := p.byKey[key]
		if g == nil {
			return nil, p.changed
		}
		ts, next = g.tunnels, &g.next
	}
	for range ts {
		*next = (*next + 1) % len(ts)
		if t := ts[*next]; !t.isDraining() {
			return t, nil
		}
	}
	return nil, p.changed
}

// ReverseClientConnInterface is a channel over a set of reverse tunnels. Each
// call goes to the next tunnel in the set, round-robin. With no tunnel in the
// set a call fails with Unavailable, or, with grpc.WaitForReady(true), waits
// for one.
type ReverseClientConnInterface interface {
	grpc.ClientConnInterface

	// Ready reports whether the set has a tunnel that takes calls now.
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
	t, _ := c.pool.pick(c.all, c.key)
	return t != nil
}

func (c reverseChannel) WaitForReady(ctx context.Context) error {
	for {
		t, changed := c.pool.pick(c.all, c.key)
		if t != nil {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (c reverseChannel) choose(ctx context.Context, opts []grpc.CallOption) (*tunnelClient, error) {
	wait := false
	for _, o := range opts {
		if ff, ok := o.(grpc.FailFastCallOption); ok {
			wait = !ff.FailFast
		}
	}
	for {
		t, changed := c.pool.pick(c.all, c.key)
		if t != nil {
			return t, nil
		}
		if !wait {
			if c.all {
				return nil, status.Error(codes.Unavailable, "grpctunnel: no reverse tunnel is open")
			}
			return nil, status.Errorf(codes.Unavailable, "grpctunnel: no reverse tunnel is open for key %v", c.key)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
}

func (c reverseChannel) Invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	t, err := c.choose(ctx, opts)
	if err != nil {
		return err
	}
	return t.invoke(ctx, method, req, reply, opts...)
}

func (c reverseChannel) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	t, err := c.choose(ctx, opts)
	if err != nil {
		return nil, err
	}
	return t.openStream(ctx, desc, method, opts...)
}

// comparable reports whether key can index a map without panicking.
func comparable(key any) bool {
	if key == nil {
		return true
	}
	return reflect.ValueOf(key).Comparable()
}
