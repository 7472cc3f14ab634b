package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ErrConnCacheClosed is what [ConnCache.Get] returns once the cache is
// closed, and what a call on one of its connections fails with then. It
// is an Unavailable status, so a director may return it as it is.
var ErrConnCacheClosed = status.Error(codes.Unavailable, "proxy: connection cache closed")

// DefaultConnIdleTimeout is how long a [ConnCache] keeps a connection no
// call uses, unless [CacheIdleTimeout] says otherwise: as long as a
// *grpc.ClientConn keeps its transport before it goes idle.
const DefaultConnIdleTimeout = 30 * time.Minute

// ConnCache holds one client connection per backend address, for a
// director that routes each call to an address it learns from the call
// (its metadata, a peeked message, a lookup): the connection is made on
// the first call to an address, shared by the calls after it, and closed
// once no call has used it for the idle timeout, so that addresses seen
// once do not hold connections for ever. It is gRPCat's ConnectionCache;
// [ConnCache.Get] returns a grpc.ClientConnInterface to put in a [Backend].
//
// A ConnCache is safe for concurrent use. It dials an address once however
// many calls ask for it at the same time, and holds no lock while it dials
// or closes connections. It needs no goroutine of its own: one timer
// closes the idle connections.
type ConnCache struct {
	dialOpts []grpc.DialOption
	idle     time.Duration
	clock    clock

	mu     sync.Mutex
	conns  map[string]*CachedConn
	closed bool
	timer  timer // the idle sweep, when one is due; nil when none is
	// sweeps counts idle sweeps running, for Close to wait for.
	sweeps sync.WaitGroup
}

// ConnCacheOption configures a [ConnCache]; see [NewConnCache].
type ConnCacheOption func(*ConnCache)

// CacheKeepalive sets the client keepalive parameters of the cache's
// connections. Without it gRPC's defaults apply (no keepalive pings).
// Keep Time above the backends' enforcement policy's MinTime (five minutes
// by default), or they close the connection with "too many pings".
func CacheKeepalive(kp keepalive.ClientParameters) ConnCacheOption {
	return func(c *ConnCache) { c.dialOpts = append(c.dialOpts, grpc.WithKeepaliveParams(kp)) }
}

// CacheCredentials sets the transport credentials of the cache's
// connections, for backends that expect TLS. Without it the connections
// are plaintext, as gRPCat's are, which suits backends on a private network
// or localhost only.
func CacheCredentials(creds credentials.TransportCredentials) ConnCacheOption {
	return func(c *ConnCache) { c.dialOpts = append(c.dialOpts, grpc.WithTransportCredentials(creds)) }
}

// CacheDialOptions adds opts to every connection the cache makes, after
// its credentials and keepalive: interceptors, stats handlers, a custom
// dialer, default call options. A unary interceptor sees nothing of the
// proxy's calls, which are all streams.
func CacheDialOptions(opts ...grpc.DialOption) ConnCacheOption {
	return func(c *ConnCache) { c.dialOpts = append(c.dialOpts, opts...) }
}

// CacheIdleTimeout sets how long a connection may go without a call before
// the cache closes it; the next Get for its address dials again. d <= 0
// keeps connections until they are removed or the cache closed, for a
// fixed set of backends. The default is [DefaultConnIdleTimeout].
func CacheIdleTimeout(d time.Duration) ConnCacheOption {
	return func(c *ConnCache) { c.idle = d }
}

// NewConnCache returns an empty cache configured by opts. Close it when
// done with it, to close its connections.
func NewConnCache(opts ...ConnCacheOption) *ConnCache {
	c := &ConnCache{
		// Plaintext unless an option says otherwise: a later
		// WithTransportCredentials overrides this one.
		dialOpts: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())},
		idle:     DefaultConnIdleTimeout,
		clock:    realClock{},
		conns:    make(map[string]*CachedConn),
	}
	for _, opt := range opts {
		opt(c)
	}
	return c
}

// Get returns the connection to addr (a gRPC target, as grpc.NewClient
// takes), dialling it if the cache has none: the Conn of the [Backend] a
// director routes to addr. The cache closes the connection once it is idle,
// and a call on it after that dials again, so the result may be kept; but
// after [ConnCache.Remove] or [ConnCache.Close] its calls fail. Get fails
// if addr is not a valid target, or with [ErrConnCacheClosed].
func (c *ConnCache) Get(addr string) (grpc.ClientConnInterface, error) {
	return c.get(addr)
}

func (c *ConnCache) get(addr string) (*CachedConn, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, ErrConnCacheClosed
		}
		if cc, ok := c.conns[addr]; ok {
			// Asked for: in use, as far as the idle timeout goes.
			cc.lastUsed = c.clock.Now()
			c.mu.Unlock()
			<-cc.dialled
			if cc.err != nil {
				return nil, cc.err
			}
			return cc, nil
		}
		cc := &CachedConn{cache: c, addr: addr, dialled: make(chan struct{}), lastUsed: c.clock.Now()}
		c.conns[addr] = cc
		c.mu.Unlock()

		// Others asking for addr meanwhile wait for this dial rather than
		// make their own.
		conn, err := grpc.NewClient(addr, c.dialOpts...)
		c.mu.Lock()
		gone := c.conns[addr] != cc // removed, or the cache closed
		switch {
		case err != nil:
			cc.err = err
			if !gone {
				delete(c.conns, addr) // the next Get tries again
			}
		case gone:
			cc.err = ErrConnCacheClosed
			if !c.closed {
				cc.err = errRemoved(addr)
			}
		default:
			cc.conn = conn
			c.armLocked()
		}
		c.mu.Unlock()
		close(cc.dialled)
		if err != nil {
			return nil, err
		}
		if gone {
			_ = conn.Close()
			if c.isClosed() {
				return nil, ErrConnCacheClosed
			}
			continue // removed while dialling: the caller still wants one
		}
		return cc, nil
	}
}

// Remove closes the connection to addr and forgets it, for a backend that
// is gone or whose connection is broken: gRPCat's ConnectionCache.Remove.
// Calls in progress on it fail, as do later ones through a value Get
// returned before; the next Get for addr dials again.
func (c *ConnCache) Remove(addr string) {
	c.mu.Lock()
	cc, ok := c.conns[addr]
	if ok {
		delete(c.conns, addr)
		cc.removed = true
	}
	c.mu.Unlock()
	if ok {
		cc.close()
	}
}

// Close closes every connection and the cache: a later Get fails with
// [ErrConnCacheClosed]. Calls in progress on the connections fail. It
// returns once every connection is closed.
func (c *ConnCache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	conns := c.conns
	c.conns = nil
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	for _, cc := range conns {
		cc.removed = true
	}
	c.mu.Unlock()
	for _, cc := range conns {
		cc.close()
	}
	c.sweeps.Wait()
	return nil
}

func (c *ConnCache) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// armLocked schedules an idle sweep if none is due. Every connection's idle
// time is the same, so the sweep due already is no later than the one a
// connection idle from now needs, and the sweep schedules the next.
func (c *ConnCache) armLocked() {
	if c.idle <= 0 || c.timer != nil || c.closed {
		return
	}
	c.timer = c.clock.AfterFunc(c.idle, c.sweep)
}

// sweep closes the connections idle for the idle timeout, and schedules
// itself again for the earliest of the others to become so.
func (c *ConnCache) sweep() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.sweeps.Add(1)
	defer c.sweeps.Done()
	c.timer = nil
	now := c.clock.Now()
	var expired []*CachedConn
	var next time.Duration
	for addr, cc := range c.conns {
		if cc.active > 0 || cc.conn == nil { // busy, or still dialling
			continue
		}
		left := cc.lastUsed.Add(c.idle).Sub(now)
		if left <= 0 {
			delete(c.conns, addr)
			cc.expired = true
			expired = append(expired, cc)
		} else if next == 0 || left < next {
			next = left
		}
	}
	if next > 0 {
		c.timer = c.clock.AfterFunc(next, c.sweep)
	}
	c.mu.Unlock()
	for _, cc := range expired {
		cc.close()
	}
}

func errRemoved(addr string) error {
	return status.Errorf(codes.Unavailable, "proxy: connection to %s removed from the cache", addr)
}

// CachedConn is a connection of a [ConnCache], as [ConnCache.Get] returns
// it. It counts the calls in progress on it, which keep it from being
// closed as idle; a call ends when its stream does (see
// grpc.ClientConn.NewStream: every stream must be read to its end, or its
// context cancelled).
type CachedConn struct {
	cache   *ConnCache
	addr    string
	dialled chan struct{} // closed once conn or err is set
	conn    *grpc.ClientConn
	err     error

	// Guarded by cache.mu.
	active   int       // calls in progress
	lastUsed time.Time // when it was last asked for or a call ended
	expired  bool      // closed as idle: a call dials again
	removed  bool      // closed by Remove or Close: calls fail
}

// Target is the address the connection dials.
func (cc *CachedConn) Target() string { return cc.addr }

// Invoke makes a unary call, as grpc.ClientConnInterface requires.
func (cc *CachedConn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	live, err := cc.acquire()
	if err != nil {
		return err
	}
	defer live.release()
	return live.conn.Invoke(ctx, method, args, reply, opts...)
}

// NewStream starts a streaming call, as grpc.ClientConnInterface requires;
// the proxy makes every call this way.
func (cc *CachedConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	live, err := cc.acquire()
	if err != nil {
		return nil, err
	}
	cs, err := live.conn.NewStream(ctx, desc, method, opts...)
	if err != nil {
		live.release()
		return nil, err
	}
	ts := &trackedStream{ClientStream: cs, serverStreams: desc.ServerStreams, release: live.release}
	// A call whose caller stops reading ends with its context; waiting
	// for that takes no goroutine until it happens.
	ts.stop = context.AfterFunc(ctx, ts.end)
	return ts, nil
}

// acquire counts a call starting on the connection cc stands for: cc
// itself, or, if the cache closed cc as idle, a new connection to its
// address.
func (cc *CachedConn) acquire() (*CachedConn, error) {
	c := cc.cache
	for {
		c.mu.Lock()
		switch {
		case c.closed:
			c.mu.Unlock()
			return nil, ErrConnCacheClosed
		case cc.removed:
			c.mu.Unlock()
			return nil, errRemoved(cc.addr)
		case !cc.expired:
			cc.active++
			c.mu.Unlock()
			return cc, nil
		}
		c.mu.Unlock()
		fresh, err := c.get(cc.addr)
		if err != nil {
			return nil, err
		}
		cc = fresh
	}
}

// release counts a call ending.
func (cc *CachedConn) release() {
	c := cc.cache
	c.mu.Lock()
	defer c.mu.Unlock()
	cc.active--
	if cc.active == 0 {
		cc.lastUsed = c.clock.Now()
		c.armLocked()
	}
}

// close closes the underlying connection once it is dialled, if it was
// dialled.
func (cc *CachedConn) close() {
	<-cc.dialled
	if cc.conn != nil {
		_ = cc.conn.Close()
	}
}

// trackedStream tells its connection when the call ends: when a receive
// fails (io.EOF included), when the one response of a call without server
// streaming has arrived, or when the call's context ends.
type trackedStream struct {
	grpc.ClientStream
	serverStreams bool
	release       func()
	stop          func() bool
	ended         atomic.Bool
}

func (s *trackedStream) end() {
	if s.ended.CompareAndSwap(false, true) {
		if s.stop != nil {
			s.stop()
		}
		s.release()
	}
}

func (s *trackedStream) Header() (md metadata.MD, err error) {
	md, err = s.ClientStream.Header()
	if err != nil {
		s.end()
	}
	return md, err
}

func (s *trackedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil || !s.serverStreams {
		s.end()
	}
	return err
}

// clock is time as the cache sees it; tests replace it.
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) timer
}

type timer interface{ Stop() bool }

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) timer { return time.AfterFunc(d, f) }

var _ grpc.ClientConnInterface = (*CachedConn)(nil)
