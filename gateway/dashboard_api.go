package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
)

// dashboardState is the JSON the dashboard polls at /api/state: a
// snapshot of the agents and of the recent refusals.
type dashboardState struct {
	Now      time.Time          `json:"now"`
	Agents   []dashboardAgent   `json:"agents"`
	Refusals []dashboardRefusal `json:"refusals"`
	// Replica is this gateway's id in its cluster, empty for a gateway
	// alone; Unreachable names the replicas that did not say which
	// agents they hold, and why.
	Replica     string            `json:"replica,omitempty"`
	Unreachable map[string]string `json:"unreachable_replicas,omitempty"`
}

// dashboardAgent is an agent key with its open tunnels.
type dashboardAgent struct {
	Key     string            `json:"key"`
	Tunnels []dashboardTunnel `json:"tunnels"`
}

// dashboardTunnel is one open tunnel; see adminpb.Tunnel for the fields.
// Bytes are payload bytes, sent to the agent (requests) and received from
// it (responses).
type dashboardTunnel struct {
	Peer           string    `json:"peer"`
	Identity       string    `json:"identity"`
	OpenedAt       time.Time `json:"opened_at"`
	OpenStreams    int64     `json:"open_streams"`
	StreamsStarted uint64    `json:"streams_started"`
	BytesSent      uint64    `json:"bytes_sent"`
	BytesReceived  uint64    `json:"bytes_received"`
	Replica        string    `json:"replica,omitempty"`
}

// dashboardRefusal is a Refusal.
type dashboardRefusal struct {
	Time     time.Time `json:"time"`
	Who      string    `json:"who"`
	Reason   string    `json:"reason"`
	Peer     string    `json:"peer,omitempty"`
	Identity string    `json:"identity,omitempty"`
	Key      string    `json:"key,omitempty"`
	Method   string    `json:"method,omitempty"`
	Error    string    `json:"error,omitempty"`
}

// dashboardClusterTimeout bounds how long the dashboard waits for the
// other replicas of a cluster, well within the page's own timeout.
const dashboardClusterTimeout = 2 * time.Second

// state is the dashboard's snapshot now: on a replica of a cluster, of the
// agents of the whole cluster, as ListAgents gives them.
func (g *Gateway) state(ctx context.Context) dashboardState {
	st := dashboardState{Now: time.Now(), Agents: []dashboardAgent{}, Refusals: []dashboardRefusal{}, Replica: g.self()}
	agents := g.Agents()
	if g.cluster != nil {
		ctx, cancel := context.WithTimeout(ctx, dashboardClusterTimeout)
		defer cancel()
		// Never an error: a replica that does not answer is named.
		resp, _ := (&adminService{g: g}).ListAgents(ctx, &adminpb.ListAgentsRequest{})
		agents = resp.GetAgents()
		for _, u := range resp.GetUnreachableReplicas() {
			if st.Unreachable == nil {
				st.Unreachable = make(map[string]string)
			}
			st.Unreachable[u.GetReplica()] = u.GetError()
		}
	}
	for _, a := range agents {
		da := dashboardAgent{Key: a.GetKey(), Tunnels: []dashboardTunnel{}}
		for _, t := range a.GetTunnels() {
			da.Tunnels = append(da.Tunnels, dashboardTunnel{
				Peer:           t.GetPeer(),
				Identity:       t.GetIdentity(),
				OpenedAt:       t.GetOpenedAt().AsTime(),
				OpenStreams:    t.GetOpenStreams(),
				StreamsStarted: t.GetStreamsStarted(),
				BytesSent:      t.GetBytesSent(),
				BytesReceived:  t.GetBytesReceived(),
				Replica:        t.GetReplica(),
			})
		}
		st.Agents = append(st.Agents, da)
	}
	for _, r := range g.RecentRefusals() {
		st.Refusals = append(st.Refusals, dashboardRefusal{
			Time: r.Time, Who: r.Who, Reason: string(r.Reason), Peer: r.Peer,
			Identity: r.Identity, Key: r.Key, Method: r.Method, Error: r.Error,
		})
	}
	return st
}

// serveDashboardState answers /api/state with the gateway's state as JSON.
func (g *Gateway) serveDashboardState(w http.ResponseWriter, r *http.Request) {
	dashboardHeaders(w, "application/json")
	json.NewEncoder(w).Encode(g.state(r.Context()))
}
