package main

import (
	"context"
	"fmt"
	"io"
	"time"
)

// gatewaySection makes the gateway measurements cfg asks for and returns
// their rows, none if it asks for none.
//
// The gateway rows measure the path users run: a caller reaches a service
// through a gateway and an agent (see gatewayBed), next to direct gRPC to
// the same service and to the simplest way to do the same job without
// understanding gRPC, port forwarding over one multiplexed connection (see
// l4Forward). The service is gRPC's interop TestService.
func gatewaySection(ctx context.Context, cfg config, say func(string, ...any)) []*row {
	onAgentHop := fmt.Sprintf("%v one-way delay on the agent hop", cfg.delay)
	latP50 := &row{label: fmt.Sprintf("unary latency p50, %d B, sequential ↓", unaryPayload), format: formatMicros}
	latP99 := &row{label: fmt.Sprintf("unary latency p99, %d B, sequential ↓", unaryPayload), format: formatMicros}
	rate := &row{label: fmt.Sprintf("unary throughput, %d callers ↑", cfg.callers), format: formatRate}
	cpu := &row{label: fmt.Sprintf("CPU per call, %d callers, all parts together ↓", cfg.callers), format: formatMicros}
	big := &row{label: fmt.Sprintf("one stream, %s messages ↑", formatSize(cfg.size)), format: formatMiBps}
	small := &row{label: fmt.Sprintf("one stream, %s messages ↑", formatSize(smallMessage)), format: formatMsgRate}
	smallDelayed := &row{label: fmt.Sprintf("one stream, %s messages, %s ↑", formatSize(smallMessage), onAgentHop), format: formatMsgRate}
	rateDelayed := &row{label: fmt.Sprintf("unary throughput, %d callers, %s ↑", cfg.callers, onAgentHop), format: formatRate}
	rss := &row{label: "server RSS per connected agent ↓", format: formatHeap}
	heap := &row{label: "server heap in use per connected agent ↓", format: formatHeap}
	goroutines := &row{label: "server goroutines per connected agent ↓", format: formatCount}

	timed := []timedBench{
		{keyGatewayLatency, "gateway unary latency", false, unaryLatency(testUnaryCall()), []*row{latP50, latP99}},
		{keyGatewayThroughput, "gateway unary throughput", false, unaryThroughput(cfg.callers, testUnaryCall()), []*row{rate, cpu}},
		{keyGatewayStream, "gateway streaming " + formatSize(cfg.size), false, duplexStream(cfg.size, false), []*row{big}},
		{keyGatewayStream, "gateway streaming " + formatSize(smallMessage), false, duplexStream(smallMessage, true), []*row{small}},
		{keyGatewayDelay, "gateway delayed streaming " + formatSize(smallMessage), true, duplexStream(smallMessage, true), []*row{smallDelayed}},
		{keyGatewayDelay, "gateway delayed unary throughput", true, unaryThroughput(cfg.callers, testUnaryCall()), []*row{rateDelayed}},
	}
	start := func(ctx context.Context, delay time.Duration) (testbed, error) {
		b, err := startGatewayBed(ctx, delay)
		if err != nil {
			return nil, err
		}
		return b, nil
	}
	rows := runTimedGroups(ctx, cfg, gatewayTargets, start, timed, say)

	if cfg.wants(keyGatewayMemory) {
		rows = append(rows, rss, heap, goroutines)
		for _, t := range gatewayTargets {
			say("gateway memory: %d clients of a %s server", cfg.idle, childKind(t))
			c, err := serverMemory(ctx, t, cfg.idle)
			rss.set(t, c.rss, err)
			heap.set(t, c.heap, err)
			goroutines.set(t, c.goroutines, err)
		}
	}
	return rows
}

// writeGatewayIntro says what the gateway table compares.
func writeGatewayIntro(out io.Writer) {
	fmt.Fprintf(out, "A caller reaches gRPC's interop TestService through a gateway and an agent, as users run them: "+
		"gateway.New, grpc.NewServer(g.ServerOptions()...) and Register on a loopback port of its own, "+
		"and agent.New(...).Run with %s, the grpctunnel agent's default; "+
		"every call names the agent in the %s header. "+
		"Beside it, direct gRPC to the service, and the L4 baseline: port forwarding as frp or ngrok do it, "+
		"where each TCP connection to the gateway side's port is carried as a yamux stream "+
		"over one TCP connection that the agent side dialled, and the agent side dials the service for each stream. "+
		"It forwards bytes without parsing them, with yamux's defaults but for frp's %s stream window.\n",
		tunnelCount(agentTunnels), "`tunnel-key`", formatSize(l4WindowSize))
}

// tunnelCount says "1 tunnel" or "n tunnels".
func tunnelCount(n int) string {
	if n == 1 {
		return "1 tunnel"
	}
	return fmt.Sprintf("%d tunnels", n)
}

// writeGatewayNotes says how the gateway rows were measured.
func writeGatewayNotes(out io.Writer, cfg config) {
	fmt.Fprintln(out, "- Callers, gateway, agent, forwarder and service share this process and cross loopback TCP; "+
		"each target has a caller connection of its own, and the agent its own connections to the gateway and to the service. "+
		"Unary rows use UnaryCall; stream rows one FullDuplexCall down which the service sends the messages, "+
		fmt.Sprintf("each request asking for %s of them, and are timed from the first message. ", formatSize(duplexBatchBytes))+
		"CPU per call is the process's CPU time (getrusage) during the throughput runs divided by the calls made: "+
		"callers and service in every column, gateway and agent or both sides of the forwarder besides, and the garbage collector; "+
		"unlike the rates, other load on the machine leaves it alone.")
	fmt.Fprintf(out, "- Delayed rows hold every byte for %v each way on the agent hop only: the connection between agent and gateway, "+
		"and the L4 forwarder's multiplexed connection, through the relay of the tunnel rows. "+
		"Direct gRPC has no agent hop, so its only connection goes through the same relay.\n", cfg.delay)
	fmt.Fprintf(out, "- Memory rows run the server alone in a child process while %d clients connect from this one, "+
		"after one warm-up client: the gateway gets agents with a connection each and %s each; "+
		"the direct column is a bare grpc-go server with one idle FullDuplexCall per connection, "+
		"the L4 column the forwarder's gateway side with one yamux session per connection. "+
		"Each figure is the growth divided by %d, read after runtime.GC and debug.FreeOSMemory: "+
		"RSS is VmRSS, heap is HeapInuse, goroutines runtime.NumGoroutine.\n", cfg.idle, tunnelCount(agentTunnels), cfg.idle)
}
