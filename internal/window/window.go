// Package window sets the HTTP/2 flow-control windows of the gateway's and
// the agent's gRPC connections, so that both ends of every hop they own
// make the same choice.
//
// gRPC-Go sizes its windows dynamically by default: whenever data arrives
// and no probe is out, the receiver sends a PING to estimate the link's
// bandwidth-delay product. A caller making one small call at a time thus
// costs every hop that receives data a PING and its ACK per call: on the
// gateway path (caller, gateway, agent, service) the ends the gateway and
// the agent own made about five of a call's fourteen writes, with as many
// reads and wake-ups: about a quarter of its latency on loopback. A window of fixed size sends no probes. Its cost is a
// ceiling of one window per round trip on each stream: 8 MiB is 80 MiB/s
// per tunnel at 100 ms, where the dynamic windows would stop at 16 MiB;
// and a stream whose reader is slow holds up to a window of data in the
// receiver, which is what Default balances against.
package window

import (
	"math"

	"google.golang.org/grpc"
)

// Default is the window of each stream when none is configured.
const Default = 8 << 20

// minWindow is HTTP/2's initial window: gRPC ignores fixed windows below
// it.
const minWindow = 64 << 10

// sizes returns the stream and connection windows for a configured size:
// 0 means Default, negative means gRPC's dynamic windows (ok false). The
// connection's window is twice the stream's, so that two busy streams do
// not wait for each other's updates.
func sizes(size int) (stream, conn int32, ok bool) {
	switch {
	case size < 0:
		return 0, 0, false
	case size == 0:
		size = Default
	}
	size = min(max(size, minWindow), math.MaxInt32/2)
	return int32(size), int32(2 * size), true
}

// ServerOptions returns the options that give a server's connections
// windows of size bytes per stream (see sizes), or none for dynamic
// windows.
func ServerOptions(size int) []grpc.ServerOption {
	stream, conn, ok := sizes(size)
	if !ok {
		return nil
	}
	return []grpc.ServerOption{grpc.InitialWindowSize(stream), grpc.InitialConnWindowSize(conn)}
}

// DialOptions returns the options that give a client connection windows of
// size bytes per stream (see sizes), or none for dynamic windows.
func DialOptions(size int) []grpc.DialOption {
	stream, conn, ok := sizes(size)
	if !ok {
		return nil
	}
	return []grpc.DialOption{grpc.WithInitialWindowSize(stream), grpc.WithInitialConnWindowSize(conn)}
}
