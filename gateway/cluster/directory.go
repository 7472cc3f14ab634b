package cluster

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Defaults for [Options].
const (
	// DefaultTTL is the lease TTL: how long a replica's entries outlive the
	// replica when it dies without closing. Shorter means callers are sent
	// to a dead replica for less time, at the price of more keepalives.
	DefaultTTL = 10 * time.Second
	// DefaultCluster is the cluster name used when Options.Cluster is empty.
	DefaultCluster = "grpctunnel"
	// DefaultProbeInterval is how often a replica checks that etcd answers.
	DefaultProbeInterval = time.Second
)

// maxTxnOps bounds the operations sent in one etcd transaction; etcd refuses
// transactions with more than 128 operations by default.
const maxTxnOps = 64

// ErrClosed is returned by [Directory.AddTunnel] after [Directory.Close].
var ErrClosed = errors.New("cluster: directory closed")

// errLeaseLost is what Healthy reports between the loss of the lease's
// keepalive and the moment the lease is confirmed alive or replaced.
var errLeaseLost = errors.New("cluster: lease keepalive lost")

// Options configures [Join]. Only Addr is required.
type Options struct {
	// Cluster names the set of replicas that share a directory; replicas of
	// different clusters may share one etcd. Default DefaultCluster.
	Cluster string
	// Prefix is the etcd key prefix of the directory. Default "/" +
	// Cluster. A trailing '/' is ignored.
	Prefix string
	// ReplicaID identifies this replica in the directory. It must be unique
	// among the live replicas of the cluster. Default: a random id, which is
	// what a replica that restarts wants, since its old entries belong to
	// its old, dead lease.
	ReplicaID string
	// Addr is the address at which the other replicas reach this one to
	// forward calls. Required.
	Addr string
	// TTL is the lease TTL, rounded up to whole seconds as etcd wants it.
	// Default DefaultTTL.
	TTL time.Duration
	// ProbeInterval is how often the replica checks that etcd answers, which
	// is how quickly an outage and a recovery are noticed. Default
	// DefaultProbeInterval.
	ProbeInterval time.Duration
	// Logger receives a line on each change of health. Default slog.Default().
	Logger *slog.Logger
}

// Replica is one gateway replica as the directory knows it.
type Replica struct {
	// ID is the replica's id, unique in the cluster.
	ID string
	// Addr is where other replicas reach it to forward calls.
	Addr string
}

// Directory is one replica's membership in the cluster's directory and its
// in-memory copy of the whole directory. Make one with [Join]; all its
// methods are safe for concurrent use.
type Directory struct {
	cli    *clientv3.Client
	log    *slog.Logger
	prefix string
	self   Replica
	ttl    int64 // seconds
	probe  time.Duration

	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{} // wakes the session loop: writes are pending
	resync chan struct{} // asks the watch loop to Get and Watch again

	closeOnce sync.Once
	closeErr  error

	mu      sync.Mutex
	closed  bool
	view    *view
	changed chan struct{}
	healthy bool
	lastErr error
	// local is this replica's own tunnels: what it must (re-)register.
	local map[localTunnel]struct{}
	// pending maps a local tunnel whose etcd key may not match local yet to
	// the sequence number of its latest change.
	pending map[localTunnel]uint64
	seq     uint64
	// lease and registered are owned by the session goroutine (and Close,
	// once that goroutine has stopped); mu guards them so tests may read.
	lease      clientv3.LeaseID
	registered bool
}

type localTunnel struct{ agent, tunnel string }

// Join registers this replica in the cluster's directory and loads the whole
// directory into memory. It returns once the replica's lease is granted, its
// registration is written and the directory is loaded, or with an error if
// ctx ends first or etcd refuses; after that, the Directory keeps itself
// current and survives etcd outages on its own until [Directory.Close].
//
// cli stays the caller's: Close does not close it.
func Join(ctx context.Context, cli *clientv3.Client, opts Options) (*Directory, error) {
	if cli == nil {
		return nil, errors.New("cluster: nil etcd client")
	}
	if opts.Addr == "" {
		return nil, errors.New("cluster: Options.Addr is required")
	}
	if opts.Cluster == "" {
		opts.Cluster = DefaultCluster
	}
	if opts.Prefix == "" {
		opts.Prefix = "/" + opts.Cluster
	}
	opts.Prefix = strings.TrimRight(opts.Prefix, "/")
	if opts.ReplicaID == "" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		opts.ReplicaID = hex.EncodeToString(b[:])
	}
	if opts.TTL <= 0 {
		opts.TTL = DefaultTTL
	}
	if opts.ProbeInterval <= 0 {
		opts.ProbeInterval = DefaultProbeInterval
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	d := &Directory{
		cli:     cli,
		log:     opts.Logger.With("cluster_prefix", opts.Prefix, "replica", opts.ReplicaID),
		prefix:  opts.Prefix,
		self:    Replica{ID: opts.ReplicaID, Addr: opts.Addr},
		ttl:     int64((opts.TTL + time.Second - 1) / time.Second),
		probe:   opts.ProbeInterval,
		kick:    make(chan struct{}, 1),
		resync:  make(chan struct{}, 1),
		view:    newView(opts.Prefix),
		changed: make(chan struct{}),
		healthy: true,
		local:   map[localTunnel]struct{}{},
		pending: map[localTunnel]uint64{},
	}
	// Register and load synchronously so that a replica that Join returned
	// is visible to the others and sees them.
	if err := d.ensureLease(ctx); err != nil {
		if d.lease != 0 {
			_, _ = cli.Revoke(context.WithoutCancel(ctx), d.lease)
		}
		return nil, fmt.Errorf("cluster: register replica %q: %w", d.self.ID, err)
	}
	// The load below covers what the resync asked by ensureLease wants.
	select {
	case <-d.resync:
	default:
	}
	get, err := d.load(ctx)
	if err != nil {
		_, _ = cli.Revoke(context.WithoutCancel(ctx), d.lease)
		return nil, fmt.Errorf("cluster: load directory: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	d.wg.Add(2)
	go d.sessionLoop(runCtx)
	go d.watchLoop(runCtx, get)
	return d, nil
}

// Self returns this replica as the directory knows it.
func (d *Directory) Self() Replica { return d.self }

// Changed returns a channel that is closed at the next change of anything
// the accessors report (Holders, Replicas, Healthy). Take the channel, then
// read the accessors, then wait on it: no change is missed that way. It
// exists so that callers (and tests) can wait for a change without polling.
func (d *Directory) Changed() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.changed
}

// notifyLocked wakes the waiters on Changed. d.mu must be held.
func (d *Directory) notifyLocked() {
	close(d.changed)
	d.changed = make(chan struct{})
}

// Healthy reports whether this replica is in touch with etcd; if not, the
// error says why. While unhealthy, the directory still answers with the last
// state it saw, and this replica's own changes are written when etcd is back.
func (d *Directory) Healthy() (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.healthy, d.lastErr
}

// setHealth records the outcome of a talk with etcd and logs a change of
// state, once per change, so that an outage is one line, not one per try.
func (d *Directory) setHealth(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ok := err == nil
	if ok == d.healthy && (ok || d.lastErr != nil) {
		d.lastErr = err
		return
	}
	d.healthy, d.lastErr = ok, err
	if ok {
		d.log.Info("cluster: etcd reachable again")
	} else {
		d.log.Warn("cluster: etcd unreachable, serving the last directory", "err", err)
	}
	d.notifyLocked()
}

// Holders returns the replicas that hold at least one tunnel of agentKey,
// sorted by id so that every replica sees the same order, without this
// replica if excludeSelf is set (a replica that forwards wants the others).
// Only replicas whose registration is present are returned, since one
// cannot forward to a replica whose address is unknown.
func (d *Directory) Holders(agentKey string, excludeSelf bool) []Replica {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Replica
	for _, h := range d.view.agents[agentKey] {
		if !h.rep.registered || (excludeSelf && h.rep.id == d.self.ID) {
			continue
		}
		if slices.ContainsFunc(out, func(r Replica) bool { return r.ID == h.rep.id }) {
			continue
		}
		out = append(out, Replica{ID: h.rep.id, Addr: h.rep.addr})
	}
	slices.SortFunc(out, func(a, b Replica) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Replicas returns every registered replica of the cluster, this one
// included, sorted by id.
func (d *Directory) Replicas() []Replica {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Replica
	for _, r := range d.view.replicas {
		if r.registered {
			out = append(out, Replica{ID: r.id, Addr: r.addr})
		}
	}
	slices.SortFunc(out, func(a, b Replica) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// TunnelsOf returns how many tunnel entries of replicaID this replica's
// copy of the directory holds. A replica that withdraws its tunnels waits
// for its own count to reach zero: its copy follows the same watch as the
// others', so by then theirs have about caught up too.
func (d *Directory) TunnelsOf(replicaID string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r := d.view.replicas[replicaID]; r != nil {
		return r.tunnels
	}
	return 0
}

// Revision returns the etcd revision the in-memory directory reflects. It
// lets a test or an operator compare replicas' views.
func (d *Directory) Revision() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.view.rev
}

// AddTunnel records that this replica holds tunnel tunnelID of agentKey, and
// returns the function that records its end. It does not wait on etcd: the
// one Put is made in the background (and again after a lease is lost), so
// opening a tunnel is not slowed, nor refused, by an etcd outage. remove is
// idempotent; calling it after Close does nothing. Adding the same pair twice
// records it once.
func (d *Directory) AddTunnel(agentKey, tunnelID string) (remove func(), err error) {
	if agentKey == "" || tunnelID == "" {
		return nil, errors.New("cluster: empty agent key or tunnel id")
	}
	lt := localTunnel{agent: agentKey, tunnel: tunnelID}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, ErrClosed
	}
	d.local[lt] = struct{}{}
	d.seq++
	d.pending[lt] = d.seq
	d.mu.Unlock()
	d.wake()
	var once sync.Once
	return func() { once.Do(func() { d.removeTunnel(lt) }) }, nil
}

func (d *Directory) removeTunnel(lt localTunnel) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	delete(d.local, lt)
	d.seq++
	d.pending[lt] = d.seq
	d.mu.Unlock()
	d.wake()
}

func (d *Directory) wake() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// Close revokes this replica's lease, so that all its entries vanish from
// every replica's directory at once, and stops the Directory's goroutines.
// It does not close the etcd client. It is idempotent: later calls return
// the first call's result. If ctx ends before etcd answers, the entries
// vanish anyway when the lease's TTL runs out.
func (d *Directory) Close(ctx context.Context) error {
	d.closeOnce.Do(func() {
		d.mu.Lock()
		d.closed = true
		d.mu.Unlock()
		d.cancel()
		d.wg.Wait()
		d.mu.Lock()
		lease := d.lease
		d.lease, d.registered = 0, false
		d.mu.Unlock()
		if lease != 0 {
			if _, err := d.cli.Revoke(ctx, lease); err != nil {
				d.closeErr = fmt.Errorf("cluster: revoke lease: %w", err)
			}
		}
	})
	return d.closeErr
}

// opCtx bounds one etcd request, so that an outage shows as an error rather
// than a hang and the loops go on.
func (d *Directory) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, max(d.probe, time.Second))
}

// sessionLoop keeps the lease alive, writes this replica's changes and
// watches etcd's health. It owns d.lease and d.registered.
func (d *Directory) sessionLoop(ctx context.Context) {
	defer d.wg.Done()
	tick := time.NewTicker(d.probe)
	defer tick.Stop()
	var ka <-chan *clientv3.LeaseKeepAliveResponse
	kaCancel := context.CancelFunc(func() {})
	defer func() { kaCancel() }()
	for {
		if ka == nil {
			err := d.ensureLease(ctx)
			if err == nil {
				ka, kaCancel, err = d.keepAlive(ctx)
			}
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				d.setHealth(err)
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				continue
			}
		}
		if err := d.flush(ctx); err != nil && ctx.Err() == nil {
			d.setHealth(err)
		}
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ka:
			if !ok {
				// The client gave up on the lease: etcd did not answer
				// within the TTL, or said the lease is gone. ensureLease
				// finds out which once etcd answers.
				kaCancel()
				ka = nil
				d.setHealth(errLeaseLost)
			}
		case <-d.kick:
		case <-tick.C:
			c, cancel := d.opCtx(ctx)
			_, err := d.cli.Get(c, replicaKey(d.prefix, d.self.ID), clientv3.WithCountOnly())
			cancel()
			if ctx.Err() != nil {
				return
			}
			d.setHealth(err)
		}
	}
}

// keepAlive starts the client's keepalive of the current lease; cancel
// stops it.
func (d *Directory) keepAlive(ctx context.Context) (<-chan *clientv3.LeaseKeepAliveResponse, context.CancelFunc, error) {
	d.mu.Lock()
	lease := d.lease
	d.mu.Unlock()
	kaCtx, cancel := context.WithCancel(ctx)
	ka, err := d.cli.KeepAlive(kaCtx, lease)
	if err != nil {
		cancel()
		return nil, func() {}, err
	}
	return ka, cancel, nil
}

// ensureLease makes sure this replica has a live lease and that its
// registration and all its local tunnels are written under it. A lease that
// etcd still knows is kept (its keys are still there); an expired one is
// replaced, and then everything is written again and the directory reloaded,
// since the other replicas have seen this one's entries vanish.
func (d *Directory) ensureLease(ctx context.Context) error {
	d.mu.Lock()
	lease := d.lease
	d.mu.Unlock()
	if lease != 0 {
		c, cancel := d.opCtx(ctx)
		ttl, err := d.cli.TimeToLive(c, lease)
		cancel()
		if err != nil {
			return err
		}
		if ttl.TTL <= 0 {
			d.log.Warn("cluster: lease expired, registering again with a new lease")
			d.mu.Lock()
			d.lease, d.registered = 0, false
			d.mu.Unlock()
			lease = 0
		}
	}
	if lease == 0 {
		c, cancel := d.opCtx(ctx)
		g, err := d.cli.Grant(c, d.ttl)
		cancel()
		if err != nil {
			return err
		}
		d.mu.Lock()
		d.lease, d.registered = g.ID, false
		d.mu.Unlock()
		lease = g.ID
	}
	d.mu.Lock()
	registered := d.registered
	d.mu.Unlock()
	if registered {
		return nil
	}
	if err := d.register(ctx, lease); err != nil {
		return err
	}
	d.mu.Lock()
	d.registered = true
	d.mu.Unlock()
	select {
	case d.resync <- struct{}{}:
	default:
	}
	return nil
}

// register writes this replica's key and every local tunnel under lease, in
// transactions of at most maxTxnOps operations, and clears the pending
// changes that this covers.
func (d *Directory) register(ctx context.Context, lease clientv3.LeaseID) error {
	val, err := json.Marshal(replicaValue{Addr: d.self.Addr})
	if err != nil {
		return err
	}
	d.mu.Lock()
	seq := d.seq
	ops := make([]clientv3.Op, 0, 1+len(d.local))
	ops = append(ops, clientv3.OpPut(replicaKey(d.prefix, d.self.ID), string(val), clientv3.WithLease(lease)))
	for lt := range d.local {
		ops = append(ops, clientv3.OpPut(tunnelKey(d.prefix, lt.agent, d.self.ID, lt.tunnel), "", clientv3.WithLease(lease)))
	}
	d.mu.Unlock()
	if err := d.commit(ctx, ops); err != nil {
		return err
	}
	// Everything local as of seq is now in etcd; removals made before seq
	// were under the expired lease, whose keys are gone.
	d.mu.Lock()
	for lt, s := range d.pending {
		if s <= seq {
			delete(d.pending, lt)
		}
	}
	d.mu.Unlock()
	return nil
}

// flush writes the pending local changes: one Put or Delete per tunnel,
// several together in one transaction when several are pending.
func (d *Directory) flush(ctx context.Context) error {
	d.mu.Lock()
	if len(d.pending) == 0 || !d.registered {
		d.mu.Unlock()
		return nil
	}
	lease := d.lease
	type item struct {
		lt  localTunnel
		seq uint64
	}
	items := make([]item, 0, len(d.pending))
	ops := make([]clientv3.Op, 0, len(d.pending))
	for lt, s := range d.pending {
		items = append(items, item{lt, s})
		k := tunnelKey(d.prefix, lt.agent, d.self.ID, lt.tunnel)
		if _, ok := d.local[lt]; ok {
			ops = append(ops, clientv3.OpPut(k, "", clientv3.WithLease(lease)))
		} else {
			ops = append(ops, clientv3.OpDelete(k))
		}
	}
	d.mu.Unlock()
	if err := d.commit(ctx, ops); err != nil {
		return err
	}
	d.mu.Lock()
	for _, it := range items {
		if d.pending[it.lt] == it.seq {
			delete(d.pending, it.lt)
		}
	}
	d.mu.Unlock()
	return nil
}

// commit sends ops: a single one as itself, more in transactions.
func (d *Directory) commit(ctx context.Context, ops []clientv3.Op) error {
	for len(ops) > 0 {
		n := min(len(ops), maxTxnOps)
		c, cancel := d.opCtx(ctx)
		var err error
		if n == 1 {
			_, err = d.cli.Do(c, ops[0])
		} else {
			_, err = d.cli.Txn(c).Then(ops[:n]...).Commit()
		}
		cancel()
		if err != nil {
			return err
		}
		ops = ops[n:]
	}
	return nil
}

// load reads the whole directory and installs it as the in-memory view.
func (d *Directory) load(ctx context.Context) (*clientv3.GetResponse, error) {
	c, cancel := context.WithTimeout(ctx, max(10*d.probe, 5*time.Second))
	defer cancel()
	get, err := d.cli.Get(c, d.prefix+"/", clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	v := newView(d.prefix)
	for _, kv := range get.Kvs {
		v.apply(string(kv.Key), kv.Value, true)
	}
	v.rev = get.Header.Revision
	d.mu.Lock()
	d.view = v
	d.notifyLocked()
	d.mu.Unlock()
	return get, nil
}

// watchLoop keeps the view current: it watches from the revision after the
// last load, and loads again when the watch ends (compaction, cancellation,
// lost leader) or when the session loop asks (new lease).
func (d *Directory) watchLoop(ctx context.Context, get *clientv3.GetResponse) {
	defer d.wg.Done()
	backoff := 50 * time.Millisecond
	for {
		if get == nil {
			var err error
			if get, err = d.load(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, d.probe)
				continue
			}
			backoff = 50 * time.Millisecond
		}
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := d.cli.Watch(wctx, d.prefix+"/", clientv3.WithPrefix(), clientv3.WithRev(get.Header.Revision+1))
		get = nil
		d.follow(ctx, wch)
		wcancel()
		if ctx.Err() != nil {
			return
		}
	}
}

// follow applies watch events until the watch ends or a reload is asked.
func (d *Directory) follow(ctx context.Context, wch clientv3.WatchChan) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.resync:
			return
		case wr, ok := <-wch:
			if !ok || wr.Canceled || wr.Err() != nil {
				if ok && wr.CompactRevision != 0 {
					d.log.Info("cluster: watch compacted, reloading the directory", "compact_revision", wr.CompactRevision)
				}
				return
			}
			d.mu.Lock()
			changed := false
			for _, ev := range wr.Events {
				if d.view.apply(string(ev.Kv.Key), ev.Kv.Value, ev.Type == clientv3.EventTypePut) {
					changed = true
				}
			}
			if wr.Header.Revision > d.view.rev {
				d.view.rev = wr.Header.Revision
			}
			if changed {
				d.notifyLocked()
			}
			d.mu.Unlock()
		}
	}
}
