package gateway

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// Label values for calls that cannot be put down to one known agent key.
const (
	labelNone   = "_none"   // the call named no agent
	labelOther  = "_other"  // a key beyond MaxMetricKeys, or no agent's
	labelFanout = "_fanout" // the call named several agents
)

const defaultMaxMetricKeys = 100

// metrics are the gateway's Prometheus collectors.
type metrics struct {
	keys *keyLabels

	tunnels      *prometheus.GaugeVec
	tunnelsTotal *prometheus.CounterVec
	rpcs         *prometheus.CounterVec
	bytes        *prometheus.CounterVec
	inFlight     prometheus.Gauge
	refused      *prometheus.CounterVec
	forwarded    *prometheus.CounterVec
}

// Results of forwarding a call to another replica, for the forwarded
// metric.
const (
	forwardStarted     = "forwarded"          // a replica holding the agent took the call
	forwardUnreachable = "holder_unreachable" // one holder could not be reached; the next was tried
	forwardFailed      = "failed"             // no holder could be reached: the call failed
)

func newMetrics(reg prometheus.Registerer, maxKeys int) (*metrics, error) {
	if maxKeys <= 0 {
		maxKeys = defaultMaxMetricKeys
	}
	m := &metrics{
		keys: &keyLabels{max: maxKeys, known: make(map[string]struct{})},
		tunnels: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "grpctunnel_gateway_agent_tunnels",
			Help: "Reverse tunnels open from agents, by agent key.",
		}, []string{"key"}),
		tunnelsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpctunnel_gateway_agent_tunnels_opened_total",
			Help: "Reverse tunnels opened by agents, by agent key.",
		}, []string{"key"}),
		rpcs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpctunnel_gateway_rpcs_total",
			Help: "Calls ended at the gateway, by the agent key they named and gRPC status code.",
		}, []string{"key", "code"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpctunnel_gateway_rpc_bytes_total",
			Help: "Message bytes of calls through the gateway, by agent key and direction (in: from callers, out: to callers).",
		}, []string{"key", "direction"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "grpctunnel_gateway_rpcs_in_flight",
			Help: "Calls in progress at the gateway.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpctunnel_gateway_refused_total",
			Help: "Agents' tunnels, callers' calls and clients' TLS handshakes the gateway refused, by who (agent, caller, connection) and reason.",
		}, []string{"who", "reason"}),
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpctunnel_gateway_forwarded_total",
			Help: "Calls this replica sent to another replica of its cluster that holds their agent, by result: forwarded (a replica took it), holder_unreachable (one replica could not be reached; the next was tried), failed (none could).",
		}, []string{"result"}),
	}
	for _, c := range []prometheus.Collector{m.tunnels, m.tunnelsTotal, m.rpcs, m.bytes, m.inFlight, m.refused, m.forwarded} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// forward counts one result of forwarding a call to another replica; m
// may be nil.
func (m *metrics) forward(result string) {
	if m != nil {
		m.forwarded.WithLabelValues(result).Inc()
	}
}

func (m *metrics) tunnelOpened(key string) {
	m.keys.admit(key)
	l := m.keys.label(key)
	m.tunnels.WithLabelValues(l).Inc()
	m.tunnelsTotal.WithLabelValues(l).Inc()
}

func (m *metrics) tunnelClosed(key string) {
	m.tunnels.WithLabelValues(m.keys.label(key)).Dec()
}

// keyLabels bounds the label values that agent keys become: a key gets its
// own once an agent has announced it (callers cannot invent label values),
// up to max keys over the gateway's life.
type keyLabels struct {
	mu    sync.RWMutex
	max   int
	known map[string]struct{}
}

func (k *keyLabels) admit(key string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.known) < k.max {
		k.known[key] = struct{}{}
	}
}

func (k *keyLabels) label(key string) string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if _, ok := k.known[key]; ok {
		return key
	}
	return labelOther
}

// callLabel is the key label of a call that named keys.
func (k *keyLabels) callLabel(keys []string) string {
	switch len(keys) {
	case 0:
		return labelNone
	case 1:
		return k.label(keys[0])
	default:
		return labelFanout
	}
}

// callStats follows the calls on the gateway's server through gRPC's own
// events, for the call metrics and the access log, so that both see what
// the callers see: local services and calls refused before routing
// included. The agents' tunnels are left to the tunnel metrics and the
// tunnel lines of the log.
type callStats struct {
	m         *metrics   // nil without metrics
	access    *accessLog // nil without an access log
	keyHeader string
}

type callStateKey struct{}

// callState follows one call. Everything in it is chosen when the headers
// arrive, which on a server is before any payload or the end.
type callState struct {
	labels atomic.Pointer[callLabels] // nil without metrics
	skip   bool
	// What the access log needs: set at the headers, read at the end.
	method string
	key    string
	remote net.Addr
	// Payload bytes, from the receiving and the sending goroutine.
	in, out atomic.Int64
}

// callLabels are a call's key label and the byte counters it selects.
type callLabels struct {
	key     string
	in, out prometheus.Counter
}

func (h *callStats) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	st := &callState{skip: strings.HasPrefix(info.FullMethodName, "/"+tunnelpb.TunnelService_ServiceDesc.ServiceName+"/")}
	return context.WithValue(ctx, callStateKey{}, st)
}

func (h *callStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	st, _ := ctx.Value(callStateKey{}).(*callState)
	if st == nil || st.skip {
		return
	}
	switch s := s.(type) {
	case *stats.InHeader:
		if h.m != nil {
			l := h.m.keys.callLabel(keysIn(s.Header, h.keyHeader))
			st.labels.Store(&callLabels{key: l, in: h.m.bytes.WithLabelValues(l, "in"), out: h.m.bytes.WithLabelValues(l, "out")})
		}
		if h.access != nil {
			st.method, st.key, st.remote = s.FullMethod, keyField(s.Header.Get(h.keyHeader)), s.RemoteAddr
		}
	case *stats.Begin:
		if h.m != nil {
			h.m.inFlight.Inc()
		}
	case *stats.InPayload:
		if l := st.labels.Load(); l != nil {
			l.in.Add(float64(s.WireLength))
		}
		st.in.Add(int64(s.Length))
	case *stats.OutPayload:
		if l := st.labels.Load(); l != nil {
			l.out.Add(float64(s.WireLength))
		}
		st.out.Add(int64(s.Length))
	case *stats.End:
		if h.m != nil {
			h.m.inFlight.Dec()
			key := labelNone
			if l := st.labels.Load(); l != nil {
				key = l.key
			}
			h.m.rpcs.WithLabelValues(key, status.Code(s.Error).String()).Inc()
		}
		if h.access != nil {
			h.access.write(ctx, st, s)
		}
	}
}

func (h *callStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (h *callStats) HandleConn(context.Context, stats.ConnStats) {}
