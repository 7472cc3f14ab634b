package gateway

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// agentSet records the open tunnels of every agent, for listing; routing
// itself goes through the tunnel library's pool.
type agentSet struct {
	mu    sync.Mutex
	byKey map[string][]*agentTunnel // each oldest first
	// withdrawn is set once the replica has withdrawn from its cluster:
	// no tunnel is recorded in the directory any more.
	withdrawn bool
}

// agentTunnel is what the gateway knows of one open tunnel.
type agentTunnel struct {
	ch       tunnel.TunnelChannel
	key      string
	peer     string
	identity string
	opened   time.Time
	// release tells the cluster, if any, that the tunnel closed.
	release func()
}

func newAgentSet() *agentSet {
	return &agentSet{byKey: make(map[string][]*agentTunnel)}
}

// add records t and returns how many tunnels its key has now; hold, if
// set, records it in the cluster's directory too, unless the replica has
// withdrawn.
func (s *agentSet) add(t *agentTunnel, hold func(key string) func()) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if hold != nil && !s.withdrawn {
		t.release = hold(t.key)
	}
	s.byKey[t.key] = append(s.byKey[t.key], t)
	return len(s.byKey[t.key])
}

// remove forgets the tunnel ch and returns it with how many tunnels its key
// has left; nil if ch was never added.
func (s *agentSet) remove(ch tunnel.TunnelChannel) (*agentTunnel, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for key, ts := range s.byKey {
		for i, t := range ts {
			if t.ch != ch {
				continue
			}
			ts = slices.Delete(ts, i, i+1)
			if len(ts) == 0 {
				delete(s.byKey, key)
			} else {
				s.byKey[key] = ts
			}
			return t, len(ts)
		}
	}
	return nil, 0
}

// releaseAll withdraws every tunnel from the cluster's directory, and
// keeps the tunnels added later out of it.
func (s *agentSet) releaseAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.withdrawn = true
	for _, ts := range s.byKey {
		for _, t := range ts {
			if t.release != nil {
				t.release()
			}
		}
	}
}

// has reports whether an agent with key has a tunnel open.
func (s *agentSet) has(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byKey[key]) > 0
}

// list describes the agents with key, or all agents if key is empty, with
// replica as the holder of each tunnel.
func (s *agentSet) list(key, replica string) []*adminpb.Agent {
	s.mu.Lock()
	defer s.mu.Unlock()
	var agents []*adminpb.Agent
	for k, ts := range s.byKey {
		if key != "" && k != key {
			continue
		}
		a := &adminpb.Agent{Key: k}
		for _, t := range ts {
			info := t.ch.Info()
			a.Tunnels = append(a.Tunnels, &adminpb.Tunnel{
				Peer:           t.peer,
				OpenedAt:       timestamppb.New(t.opened),
				Identity:       t.identity,
				OpenStreams:    int64(info.OpenStreams),
				StreamsStarted: info.StreamsStarted,
				BytesSent:      info.BytesSent,
				BytesReceived:  info.BytesReceived,
				Replica:        replica,
			})
		}
		agents = append(agents, a)
	}
	slices.SortFunc(agents, func(a, b *adminpb.Agent) int { return cmp.Compare(a.Key, b.Key) })
	return agents
}

// opened records a tunnel that is ready for calls.
func (g *Gateway) opened(ch tunnel.TunnelChannel) {
	t := &agentTunnel{ch: ch, key: g.keyOf(ch.Context()), opened: time.Now()}
	if p, ok := peer.FromContext(ch.Context()); ok {
		t.peer = p.Addr.String()
		t.identity = identity(p.AuthInfo)
	}
	var hold func(string) func()
	if g.cluster != nil {
		hold = g.cluster.Hold
	}
	n := g.agents.add(t, hold)
	if g.metrics != nil {
		g.metrics.tunnelOpened(t.key)
	}
	g.log.Info("agent tunnel opened", "key", t.key, "peer", t.peer, "identity", t.identity, "tunnels", n)
}

// closed forgets a tunnel that has ended.
func (g *Gateway) closed(ch tunnel.TunnelChannel) {
	t, n := g.agents.remove(ch)
	if t == nil {
		return
	}
	if t.release != nil {
		t.release()
	}
	if g.metrics != nil {
		g.metrics.tunnelClosed(t.key)
	}
	attrs := []any{"key", t.key, "peer", t.peer, "tunnels", n, "lasted", time.Since(t.opened).Round(time.Millisecond).String()}
	if err := ch.Err(); err != nil {
		attrs = append(attrs, "err", err)
	}
	g.log.Info("agent tunnel closed", attrs...)
}

// identity is the subject of a verified TLS client certificate, or "".
func identity(info credentials.AuthInfo) string {
	if cert := leaf(info); cert != nil {
		return cert.Subject.String()
	}
	return ""
}
