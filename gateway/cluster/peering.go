package cluster

import (
	"strconv"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"

	"github.com/grpctunnel/grpctunnel/gateway"
)

// Peering is a replica's part in its cluster as a gateway needs it: it
// implements gateway.Cluster over a Directory, recording the gateway's
// tunnels in it and keeping a connection to the peer port of each other
// replica the gateway forwards to. Give it to the gateway as
// gateway.Options.Cluster.
type Peering struct {
	dir  *Directory
	dial []grpc.DialOption
	// tunnels numbers this replica's tunnels: an id need only be unique
	// under this replica's lease.
	tunnels atomic.Uint64

	mu     sync.Mutex
	conns  map[Replica]*grpc.ClientConn
	closed bool

	stop chan struct{}
	done chan struct{}
}

// NewPeering returns the Peering of the replica that joined dir, which
// dials the other replicas' peer ports with opts (their credentials above
// all: the peer ports admit replicas only). Connections are made when a
// call first needs them and closed when their replica leaves the
// directory. Close it before closing dir.
func NewPeering(dir *Directory, opts ...grpc.DialOption) *Peering {
	p := &Peering{
		dir:   dir,
		dial:  opts,
		conns: make(map[Replica]*grpc.ClientConn),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	go p.prune()
	return p
}

// Self is this replica's id in the directory.
func (p *Peering) Self() string { return p.dir.Self().ID }

// Hold records one more tunnel for key in the directory, in the
// background (see Directory.AddTunnel); release removes it. After Close
// it records nothing.
func (p *Peering) Hold(key string) (release func()) {
	id := "t" + strconv.FormatUint(p.tunnels.Add(1), 10)
	remove, err := p.dir.AddTunnel(key, id)
	if err != nil {
		return func() {}
	}
	return remove
}

// Holders returns the other replicas that hold tunnels for key.
func (p *Peering) Holders(key string) []gateway.Peer {
	return p.peers(p.dir.Holders(key, true))
}

// Replicas returns every other replica of the cluster.
func (p *Peering) Replicas() []gateway.Peer {
	all := p.dir.Replicas()
	self := p.dir.Self().ID
	others := all[:0]
	for _, r := range all {
		if r.ID != self {
			others = append(others, r)
		}
	}
	return p.peers(others)
}

// peers pairs replicas with their connections, dialling those it has not
// yet. A replica whose address cannot even be parsed gets no connection,
// which the gateway reports as a replica it cannot call.
func (p *Peering) peers(rs []Replica) []gateway.Peer {
	if len(rs) == 0 {
		return nil
	}
	out := make([]gateway.Peer, 0, len(rs))
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range rs {
		cc, ok := p.conns[r]
		if !ok && !p.closed {
			// NewClient does not connect: holding the lock is brief.
			cc, _ = grpc.NewClient(r.Addr, p.dial...)
			p.conns[r] = cc
		}
		peer := gateway.Peer{ID: r.ID}
		if cc != nil {
			peer.Conn = cc
		}
		out = append(out, peer)
	}
	return out
}

// prune closes the connections of replicas that have left the directory
// (or changed address), whenever the directory changes.
func (p *Peering) prune() {
	defer close(p.done)
	for {
		// Taken before the directory is read, so that no change goes
		// unseen between the two.
		changed := p.dir.Changed()
		select {
		case <-changed:
		case <-p.stop:
			return
		}
		live := make(map[Replica]bool)
		for _, r := range p.dir.Replicas() {
			live[r] = true
		}
		var gone []*grpc.ClientConn
		p.mu.Lock()
		for r, cc := range p.conns {
			if !live[r] {
				delete(p.conns, r)
				if cc != nil {
					gone = append(gone, cc)
				}
			}
		}
		p.mu.Unlock()
		for _, cc := range gone {
			_ = cc.Close()
		}
	}
}

// Close closes every connection to the other replicas. It does not close
// the directory.
func (p *Peering) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	close(p.stop)
	<-p.done
	for _, cc := range conns {
		if cc != nil {
			_ = cc.Close()
		}
	}
}
