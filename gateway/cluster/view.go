package cluster

import (
	"encoding/json"
	"net/url"
	"strings"
)

// Key layout below the prefix; see the package documentation.
const (
	replicasDir = "/replicas/"
	tunnelsDir  = "/tunnels/"
)

// replicaValue is the JSON stored at <prefix>/replicas/<replicaID>. It is
// kept small and open to additions: readers ignore fields they do not know.
type replicaValue struct {
	Addr string `json:"addr"`
}

// replicaRef is the one in-memory record of a replica, shared by the
// replica's registration and all its tunnel entries, so that an entry costs a
// pointer rather than a copy of the id and the address.
type replicaRef struct {
	id         string
	addr       string
	registered bool // its <prefix>/replicas/<id> key exists
	tunnels    int  // how many tunnel entries point here
}

// holder is one tunnel entry: which replica holds it and the tunnel's id.
type holder struct {
	rep    *replicaRef
	tunnel string
}

// view is an in-memory copy of the directory. It is not safe for concurrent
// use: the Directory guards it with its mutex.
type view struct {
	prefix   string
	replicas map[string]*replicaRef
	// agents maps an (unescaped) agent key to its tunnel entries. A slice,
	// not a map, because an agent has few tunnels and a small map costs far
	// more memory than the entries themselves.
	agents map[string][]holder
	rev    int64
}

func newView(prefix string) *view {
	return &view{prefix: prefix, replicas: map[string]*replicaRef{}, agents: map[string][]holder{}}
}

func replicaKey(prefix, replicaID string) string {
	return prefix + replicasDir + url.PathEscape(replicaID)
}

func tunnelKey(prefix, agentKey, replicaID, tunnelID string) string {
	return prefix + tunnelsDir + url.PathEscape(agentKey) + "/" + url.PathEscape(replicaID) + "/" + url.PathEscape(tunnelID)
}

// ref returns the replica's record, creating it if needed.
func (v *view) ref(id string) *replicaRef {
	r := v.replicas[id]
	if r == nil {
		r = &replicaRef{id: id}
		v.replicas[id] = r
	}
	return r
}

// release forgets a replica record that nothing refers to any more, so that
// replicas that came and went do not accumulate.
func (v *view) release(r *replicaRef) {
	if !r.registered && r.tunnels == 0 {
		delete(v.replicas, r.id)
	}
}

// apply records a put (put true) or a delete of key. It reports whether the
// view changed; keys it does not understand are ignored, so that a later
// version may add keys without breaking this one.
func (v *view) apply(key string, value []byte, put bool) bool {
	rest, ok := strings.CutPrefix(key, v.prefix)
	if !ok {
		return false
	}
	if s, ok := strings.CutPrefix(rest, replicasDir); ok {
		id, err := url.PathUnescape(s)
		if err != nil || strings.Contains(s, "/") {
			return false
		}
		return v.applyReplica(id, value, put)
	}
	if s, ok := strings.CutPrefix(rest, tunnelsDir); ok {
		parts := strings.Split(s, "/")
		if len(parts) != 3 {
			return false
		}
		var un [3]string
		for i, p := range parts {
			u, err := url.PathUnescape(p)
			if err != nil {
				return false
			}
			un[i] = u
		}
		if put {
			return v.addTunnel(un[0], un[1], un[2])
		}
		return v.removeTunnel(un[0], un[1], un[2])
	}
	return false
}

func (v *view) applyReplica(id string, value []byte, put bool) bool {
	if !put {
		r := v.replicas[id]
		if r == nil || !r.registered {
			return false
		}
		r.registered, r.addr = false, ""
		v.release(r)
		return true
	}
	var rv replicaValue
	if err := json.Unmarshal(value, &rv); err != nil {
		// A registration we cannot read is not one we can forward to.
		return false
	}
	r := v.ref(id)
	if r.registered && r.addr == rv.Addr {
		return false
	}
	r.registered, r.addr = true, rv.Addr
	return true
}

func (v *view) addTunnel(agentKey, replicaID, tunnelID string) bool {
	hs := v.agents[agentKey]
	for _, h := range hs {
		if h.rep.id == replicaID && h.tunnel == tunnelID {
			return false
		}
	}
	r := v.ref(replicaID)
	r.tunnels++
	if hs == nil {
		// Exact capacity: most agents have one tunnel, and append's
		// growth would otherwise waste room in every entry.
		hs = make([]holder, 0, 1)
		// The key and the id may be substrings of the whole etcd key
		// (PathUnescape returns its input when nothing is escaped):
		// copies keep only themselves alive, not the key around them.
		agentKey = strings.Clone(agentKey)
	}
	v.agents[agentKey] = append(hs, holder{rep: r, tunnel: strings.Clone(tunnelID)})
	return true
}

func (v *view) removeTunnel(agentKey, replicaID, tunnelID string) bool {
	hs := v.agents[agentKey]
	for i, h := range hs {
		if h.rep.id != replicaID || h.tunnel != tunnelID {
			continue
		}
		last := len(hs) - 1
		hs[i] = hs[last]
		hs[last] = holder{} // drop the references for the GC
		if last == 0 {
			delete(v.agents, agentKey)
		} else {
			v.agents[agentKey] = hs[:last]
		}
		h.rep.tunnels--
		v.release(h.rep)
		return true
	}
	return false
}
