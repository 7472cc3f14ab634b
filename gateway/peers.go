package gateway

import (
	"context"
	"crypto/subtle"
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/proxy"
)

// PeerHeader is the header one gateway replica sends, with the cluster's
// token (Options.ClusterToken), on a call it forwards to another replica:
// once for the first hop, twice for the second. It tells the receiving
// replica that the call was already authorized and how far it came, so
// that a call crosses at most two hops between replicas however stale
// their views of the cluster are (see viaPeers). The gateway removes it
// before a call goes to an agent.
const PeerHeader = "grpctunnel-peer"

// maxPeerHops bounds the hops a call makes between replicas. The first is
// the rule; the second happens only when the first reached a replica whose
// tunnel for the agent had just gone (it drained, or the agent moved the
// tunnel) before the sender's view of the cluster showed it.
const maxPeerHops = 2

// Cluster, if set in Options, makes this gateway one replica of several
// that serve one set of agents: a caller may reach any replica, and a
// replica that holds no tunnel for the agent a call names forwards the
// call, once, to a replica that does. It is an interface so that the
// gateway does not depend on how the replicas learn who holds what (a
// directory in etcd, as package gateway/cluster keeps, or a static list
// in a test).
type Cluster interface {
	// Self names this replica: to agents, in the response header of
	// the tunnels it accepts, so that an agent can spread its tunnels
	// over replicas; and in ListAgents, next to each tunnel it holds.
	Self() string
	// Hold records that this replica holds one more tunnel for key, so
	// that the other replicas forward calls for key here; release
	// records that the tunnel closed, or that the replica withdrew it
	// (see Gateway.Withdraw), and may be called more than once. It is
	// called as a tunnel opens and must not block on the network.
	Hold(key string) (release func())
	// Holders returns the other replicas that hold tunnels for key; none
	// if no other replica does. The gateway spreads calls over them, and
	// tries the next when one cannot be reached. It is called on every
	// call this replica cannot route locally, so it must not block.
	Holders(key string) []Peer
	// Replicas returns every other replica, for the calls that ask the
	// whole cluster (ListAgents).
	Replicas() []Peer
}

// Peer is another gateway replica, as Peers.Holders returns it.
type Peer struct {
	// ID names the replica in the errors callers get, so that a caller
	// or operator can tell which hop failed.
	ID string
	// Conn is a connection to the replica's peer port, the server built
	// with its PeerServerOptions. The gateway forwards calls on it with
	// the raw codec of package proxy, and asks it for its agents with
	// the protobuf codec; it must not force a codec of its own.
	Conn grpc.ClientConnInterface
}

// errNotReplica refuses a call that claims to come from a replica but
// does not carry this cluster's token, or comes to the callers' port.
var errNotReplica = status.Error(codes.PermissionDenied, "grpctunnel gateway: not a replica of this cluster")

// errShuttingDown refuses a tunnel once the gateway has withdrawn, in the
// words agents take for a restart (see tunnel.ServeWithReconnect).
var errShuttingDown = status.Error(codes.Unavailable, "grpctunnel: server is shutting down")

// errPeerPortOnly refuses a caller's call on the peer port.
var errPeerPortOnly = status.Error(codes.PermissionDenied, "grpctunnel gateway: this is a peer port, for the replicas of the cluster only; call the gateway's own address")

// fromPeer checks the peer header of a call on the peer port: it reports
// whether another replica of this cluster forwarded the call, and refuses
// the call if it carries the header without this cluster's token (or this
// gateway has none), or more times than a call may hop, so that a caller
// cannot skip authorization by claiming to be a replica.
func (g *Gateway) fromPeer(ctx context.Context) (bool, error) {
	values := metadata.ValueFromIncomingContext(ctx, PeerHeader)
	if len(values) == 0 {
		return false, nil
	}
	if len(values) > maxPeerHops {
		return false, Refuse(ReasonBadToken, errNotReplica)
	}
	for _, v := range values {
		if !g.acceptsClusterToken(v) {
			return false, Refuse(ReasonBadToken, errNotReplica)
		}
	}
	return true, nil
}

// peerHops is how many hops between replicas a call has made: the times it
// carries PeerHeader, which fromPeer has checked.
func peerHops(ctx context.Context) int {
	return len(metadata.ValueFromIncomingContext(ctx, PeerHeader))
}

// acceptsClusterToken reports whether token is one of the cluster's,
// comparing with each in constant time.
func (g *Gateway) acceptsClusterToken(token string) bool {
	ok := false
	for _, t := range g.clusterTokens() {
		if t != "" && subtle.ConstantTimeCompare([]byte(token), []byte(t)) == 1 {
			ok = true
		}
	}
	return ok
}

// clusterToken is the token this replica sends to the others: the first
// of the cluster's, or "" if it has none, which the others refuse.
func (g *Gateway) clusterToken() string {
	if tokens := g.clusterTokens(); len(tokens) > 0 {
		return tokens[0]
	}
	return ""
}

// viaPeers is the backend of a call for key, which this gateway does not
// hold (or holds only in tunnels it is draining), through the replicas that
// do, if there are any. A call another replica forwarded here (handle has
// refused a peer header without the cluster's token, so one present here
// is a replica's) is forwarded again only if this replica holds no tunnel
// for its agent: the sender's view was stale, this replica's tunnel having
// just gone. Such a second hop is the last (maxPeerHops), so that a call
// never bounces between replicas whose views disagree.
func (g *Gateway) viaPeers(ctx context.Context, key string) (proxy.Backend, bool) {
	if g.cluster == nil {
		return proxy.Backend{}, false
	}
	hops := peerHops(ctx)
	switch {
	case hops >= maxPeerHops:
		return proxy.Backend{}, false
	case hops > 0 && g.agents.has(key):
		// A forwarded call for an agent this replica still holds (it may
		// be withdrawn, draining) is served here.
		return proxy.Backend{}, false
	}
	holders := g.cluster.Holders(key)
	if len(holders) == 0 {
		return proxy.Backend{}, false
	}
	return proxy.Backend{Name: key, Conn: &peerConn{g: g, key: key, holders: holders, hops: hops + 1}}, true
}

// peerConn forwards one call to the first of the replicas holding its
// agent that accepts it, starting from a different one on each call. The next replica is tried only when a replica
// cannot start the call at all (its connection is down): once a call has
// started, its requests may already have reached the agent, and only the
// caller may decide to repeat it. A replica that answers (even to say
// that its agent has just gone) ends the call with its answer.
type peerConn struct {
	g       *Gateway
	key     string
	holders []Peer
	hops    int // the hop this forward makes: PeerHeader is sent this many times
}

// Invoke is never used: the proxy makes every call as a stream.
func (c *peerConn) Invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	return status.Error(codes.Internal, "grpctunnel gateway: unary call on a peer route")
}

// NewStream starts the call on the first holder that can take it, or
// fails with Unavailable naming the replicas that could not.
func (c *peerConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	// The route's metadata lacks the key header, which the next replica
	// routes by: this backend's own key goes back in (one of several
	// when the call fans out), with the cluster's token.
	ctx = metadata.AppendToOutgoingContext(ctx, c.g.keyHeader, c.key)
	for range c.hops {
		ctx = metadata.AppendToOutgoingContext(ctx, PeerHeader, c.g.clusterToken())
	}
	var ids, causes []string
	// Each call starts at the next holder, so that the calls for an
	// agent with tunnels on several replicas share them.
	first := int(c.g.peerTurn.Add(1) % uint64(len(c.holders)))
	for i := range c.holders {
		p := c.holders[(first+i)%len(c.holders)]
		if p.Conn == nil {
			continue
		}
		cs, err := p.Conn.NewStream(ctx, desc, method, opts...)
		if err == nil {
			c.g.metrics.forward(forwardStarted)
			return cs, nil
		}
		if ctx.Err() != nil || status.Code(err) != codes.Unavailable {
			// The caller gave up, or the replica refused the call for
			// a reason another replica would share.
			return nil, err
		}
		c.g.metrics.forward(forwardUnreachable)
		ids = append(ids, p.ID)
		causes = append(causes, status.Convert(err).Message())
	}
	c.g.metrics.forward(forwardFailed)
	agent := errtext.Quote(c.key)
	switch len(ids) {
	case 0:
		return nil, status.Errorf(codes.Unavailable, "grpctunnel gateway: no replica holding agent %s can be called", agent)
	case 1:
		return nil, status.Errorf(codes.Unavailable, "grpctunnel gateway: replica %s holding agent %s is unreachable: %s", ids[0], agent, causes[0])
	}
	var why []string
	for i, id := range ids {
		why = append(why, fmt.Sprintf("%s: %s", id, causes[i]))
	}
	return nil, status.Errorf(codes.Unavailable, "grpctunnel gateway: replicas holding agent %s are unreachable: %s", agent, strings.Join(why, "; "))
}
