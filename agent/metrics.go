package agent

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the agent's Prometheus metrics. A nil *metrics records
// nothing, so that an agent without a Registerer pays nothing for them.
type metrics struct {
	tunnelsOpen      prometheus.Gauge
	tunnelFailures   prometheus.Counter
	reachable        prometheus.Gauge
	unreachableCalls prometheus.Counter
	replicas         prometheus.Gauge
	givenBack        prometheus.Counter
}

// newMetrics registers the agent's metrics with reg, labelled with the
// agent's key so that several agents can share a registry.
func newMetrics(reg prometheus.Registerer, key string) (*metrics, error) {
	labels := prometheus.Labels{"key": key}
	m := &metrics{
		tunnelsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "grpctunnel_agent_tunnels_open", ConstLabels: labels,
			Help: "Tunnels the agent has open to the gateway.",
		}),
		tunnelFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "grpctunnel_agent_tunnel_failures_total", ConstLabels: labels,
			Help: "Tunnels that failed to open or were lost, each followed by a retry.",
		}),
		reachable: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "grpctunnel_agent_service_reachable", ConstLabels: labels,
			Help: "1 while the agent's service is reachable, 0 from a call that failed for want of it until its connection is ready again.",
		}),
		unreachableCalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "grpctunnel_agent_service_unreachable_calls_total", ConstLabels: labels,
			Help: "Calls that failed with Unavailable because the agent could not reach its service.",
		}),
		replicas: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "grpctunnel_agent_gateway_replicas", ConstLabels: labels,
			Help: "Distinct gateway replicas the agent's open tunnels are on (0 for a gateway that names none): with 1 and several tunnels, losing that replica leaves the agent unreachable until its tunnels reopen.",
		}),
		givenBack: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "grpctunnel_agent_tunnels_given_back_total", ConstLabels: labels,
			Help: "Tunnels the agent gave back at once, to reopen them on another gateway replica than one that held another of its tunnels.",
		}),
	}
	for _, c := range []prometheus.Collector{m.tunnelsOpen, m.tunnelFailures, m.reachable, m.unreachableCalls, m.replicas, m.givenBack} {
		if err := reg.Register(c); err != nil {
			return nil, errors.Join(errors.New("agent: registering metrics"), err)
		}
	}
	return m, nil
}

func (m *metrics) serviceReachable(up bool) {
	if m == nil {
		return
	}
	if up {
		m.reachable.Set(1)
	} else {
		m.reachable.Set(0)
	}
}

func (m *metrics) unreachableCall() {
	if m != nil {
		m.unreachableCalls.Inc()
	}
}

// tunnelOpen records a tunnel that opened (open) or closed.
func (m *metrics) tunnelOpen(open bool) {
	if m == nil {
		return
	}
	if open {
		m.tunnelsOpen.Inc()
	} else {
		m.tunnelsOpen.Dec()
	}
}

func (m *metrics) tunnelFailed() {
	if m != nil {
		m.tunnelFailures.Inc()
	}
}

// gatewayReplicas records how many distinct replicas the open tunnels are
// on.
func (m *metrics) gatewayReplicas(n int) {
	if m != nil {
		m.replicas.Set(float64(n))
	}
}

func (m *metrics) tunnelGivenBack() {
	if m != nil {
		m.givenBack.Inc()
	}
}
