package main

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// relayReadSize is how much the relay reads at once. Each read becomes one
// delayed chunk, so a larger buffer means fewer timers at high rates.
const relayReadSize = 64 << 10

// relayQueueChunks bounds the chunks in flight in one direction of one
// connection. It is far above what the links in this bench need (a
// 10 ms delay at 1 GiB/s is 160 full chunks), so the queue models the
// latency of a long link and never its bandwidth.
const relayQueueChunks = 4096

// relay is a TCP proxy on loopback that holds every byte for a fixed delay
// in each direction: a long link, without its bandwidth limit. The bench uses
// it to show how tunnels fare when round trips are long, which is where flow
// control windows decide throughput. Direct gRPC goes through the same relay
// for its baseline.
//
// Each direction of each connection has a reader, which stamps every chunk
// it reads with the time it may leave, and a writer, which sends the chunks
// in order once that time has come. The reader never waits for the writer,
// so the delay adds latency but does not throttle.
type relay struct {
	lis    net.Listener
	target string
	delay  time.Duration
	wg     sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// startRelay listens on a loopback port and relays every connection to
// target with the given one-way delay.
func startRelay(target string, delay time.Duration) (*relay, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &relay{lis: lis, target: target, delay: delay, conns: map[net.Conn]struct{}{}}
	r.wg.Go(r.accept)
	return r, nil
}

// addr is the address to dial instead of the target.
func (r *relay) addr() string { return r.lis.Addr().String() }

// close stops accepting, cuts every relayed connection and returns once all
// of the relay's goroutines have ended.
func (r *relay) close() {
	r.mu.Lock()
	r.closed = true
	for c := range r.conns {
		_ = c.Close()
	}
	r.mu.Unlock()
	_ = r.lis.Close()
	r.wg.Wait()
}

func (r *relay) accept() {
	for {
		client, err := r.lis.Accept()
		if err != nil {
			return // closed
		}
		r.wg.Go(func() { r.relayConn(client) })
	}
}

// track records c so that close can cut it; it reports false, having closed
// c, if the relay is already closing.
func (r *relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		_ = c.Close()
		return false
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *relay) untrack(c net.Conn) {
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
	_ = c.Close()
}

// relayConn connects client to the target and relays both directions
// until both have ended.
func (r *relay) relayConn(client net.Conn) {
	if !r.track(client) {
		return
	}
	defer r.untrack(client)
	server, err := net.Dial("tcp", r.target)
	if err != nil {
		return // the client sees its connection close
	}
	if !r.track(server) {
		return
	}
	defer r.untrack(server)
	var wg sync.WaitGroup
	wg.Go(func() { r.pipe(server, client) })
	wg.Go(func() { r.pipe(client, server) })
	wg.Wait()
}

// chunk is bytes read from one side and the time they may be written to
// the other.
type chunk struct {
	data []byte
	due  time.Time
}

// pipe copies src to dst, each chunk r.delay after it was read, in order.
// When src ends cleanly, dst is half-closed once everything before the end
// has been written, as a real link would deliver a FIN; if either side
// fails, both are closed so that the other direction ends too.
func (r *relay) pipe(dst, src net.Conn) {
	queue := make(chan chunk, relayQueueChunks)
	var readErr error
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(queue)
		buf := make([]byte, relayReadSize)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				queue <- chunk{data: bytes.Clone(buf[:n]), due: time.Now().Add(r.delay)}
			}
			if err != nil {
				readErr = err
				return
			}
		}
	})
	var writeErr error
	for c := range queue {
		if writeErr != nil {
			continue // drain, so that the reader is never stuck on a full queue
		}
		if d := time.Until(c.due); d > 0 {
			time.Sleep(d)
		}
		if _, writeErr = dst.Write(c.data); writeErr != nil {
			_ = src.Close()
			_ = dst.Close()
		}
	}
	wg.Wait() // readErr is set
	switch {
	case writeErr != nil:
	case errors.Is(readErr, io.EOF):
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	default:
		_ = src.Close()
		_ = dst.Close()
	}
}
