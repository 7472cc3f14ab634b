package gateway

import (
	"encoding/json"
	"net/http"
	"time"
)

// dashboardState is the JSON the dashboard polls at /api/state: a
// snapshot of the agents and of the recent refusals.
type dashboardState struct {
	Now      time.Time          `json:"now"`
	Agents   []dashboardAgent   `json:"agents"`
	Refusals []dashboardRefusal `json:"refusals"`
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

// state is the dashboard's snapshot now.
func (g *Gateway) state() dashboardState {
	st := dashboardState{Now: time.Now(), Agents: []dashboardAgent{}, Refusals: []dashboardRefusal{}}
	for _, a := range g.Agents() {
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
	json.NewEncoder(w).Encode(g.state())
}
