package gateway

import (
	"context"
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
}

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
	}
	for _, c := range []prometheus.Collector{m.tunnels, m.tunnelsTotal, m.rpcs, m.bytes, m.inFlight} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
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

// statsHandler feeds the call metrics from gRPC's own events on the
// gateway's server, so they count what the callers see, local services
// included; the agents' tunnels are counted by the tunnel metrics instead.
func (m *metrics) statsHandler(keyHeader string) stats.Handler {
	return &callStats{m: m, keyHeader: keyHeader}
}

type callStats struct {
	m         *metrics
	keyHeader string
}

type callStateKey struct{}

// callState follows one call. Its labels are chosen when the headers
// arrive, which on a server is before any payload or the end.
type callState struct {
	labels atomic.Pointer[callLabels]
	skip   bool
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
		l := h.m.keys.callLabel(keysIn(s.Header, h.keyHeader))
		st.labels.Store(&callLabels{key: l, in: h.m.bytes.WithLabelValues(l, "in"), out: h.m.bytes.WithLabelValues(l, "out")})
	case *stats.Begin:
		h.m.inFlight.Inc()
	case *stats.InPayload:
		if l := st.labels.Load(); l != nil {
			l.in.Add(float64(s.WireLength))
		}
	case *stats.OutPayload:
		if l := st.labels.Load(); l != nil {
			l.out.Add(float64(s.WireLength))
		}
	case *stats.End:
		h.m.inFlight.Dec()
		key := labelNone
		if l := st.labels.Load(); l != nil {
			key = l.key
		}
		h.m.rpcs.WithLabelValues(key, status.Code(s.Error).String()).Inc()
	}
}

func (h *callStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (h *callStats) HandleConn(context.Context, stats.ConnStats) {}
