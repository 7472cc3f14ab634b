package main

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// l4WindowSize is the receive window of each yamux stream. frp, the most
// used port forwarder built on yamux, sets 6 MiB on both ends rather than
// yamux's default 256 KiB, which would cap one stream at 256 KiB per round
// trip on a long link; the baseline is port forwarding as it is deployed.
const l4WindowSize = 6 << 20

// l4Config is the yamux configuration of both ends of l4Forward, and of
// the idle sessions in the memory rows.
func l4Config() *yamux.Config {
	cfg := yamux.DefaultConfig()
	cfg.MaxStreamWindowSize = l4WindowSize
	cfg.LogOutput = io.Discard
	return cfg
}

// l4Forward is the gateway's baseline: port forwarding at layer 4, as frp
// or ngrok do it. Its agent side dials its gateway side once, and the two
// run a yamux session on that connection. Each TCP connection a caller
// makes to the gateway side's public port becomes a yamux stream to the
// agent side, which dials the service for it and copies bytes both ways.
// Nothing is parsed: gRPC's HTTP/2 passes through as opaque bytes, so this
// is the least a forwarder over one multiplexed connection can do, and what
// the gateway's understanding of gRPC is to be weighed against.
//
// Both sides run in this process. With a delay, the multiplexed connection
// goes through a relay, the agent hop of the gateway's path. Everything it
// starts is stopped by close.
type l4Forward struct {
	public  net.Listener // callers connect here
	mux     net.Listener // the agent side dials here
	relay   *relay       // on the multiplexed connection; nil without a delay
	gwSide  *yamux.Session
	agtSide *yamux.Session
	service string
	wg      sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]struct{} // callers' and the service's connections, and streams
	closed bool
}

// startL4Forward starts both sides of a forwarder to the service at
// service, with the given one-way delay (none if zero) on the multiplexed
// connection.
func startL4Forward(service string, delay time.Duration) (f *l4Forward, err error) {
	f = &l4Forward{service: service, conns: map[net.Conn]struct{}{}}
	defer func() {
		if err != nil {
			f.close()
		}
	}()
	if f.mux, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	if f.public, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	muxAddr := f.mux.Addr().String()
	if delay > 0 {
		inPart("relay", func() { f.relay, err = startRelay(muxAddr, delay) })
		if err != nil {
			return nil, err
		}
		muxAddr = f.relay.addr()
	}
	// The agent side dials out, as an agent behind NAT must.
	agentConn, err := net.Dial("tcp", muxAddr)
	if err != nil {
		return nil, err
	}
	if f.agtSide, err = yamux.Client(agentConn, l4Config()); err != nil {
		_ = agentConn.Close()
		return nil, err
	}
	gwConn, err := f.mux.Accept()
	if err != nil {
		return nil, err
	}
	if f.gwSide, err = yamux.Server(gwConn, l4Config()); err != nil {
		_ = gwConn.Close()
		return nil, err
	}
	f.wg.Go(f.acceptCallers)
	f.wg.Go(f.acceptStreams)
	return f, nil
}

// addr is the public port, for callers.
func (f *l4Forward) addr() string { return f.public.Addr().String() }

// close stops accepting, cuts every connection and stream, and returns once
// all of the forwarder's goroutines have ended.
func (f *l4Forward) close() {
	f.mu.Lock()
	f.closed = true
	for c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
	for _, l := range []net.Listener{f.public, f.mux} {
		if l != nil {
			_ = l.Close()
		}
	}
	for _, s := range []*yamux.Session{f.gwSide, f.agtSide} {
		if s != nil {
			_ = s.Close()
		}
	}
	if f.relay != nil {
		f.relay.close()
	}
	f.wg.Wait()
}

// acceptCallers is the gateway side: each caller's connection is carried
// on a new stream.
func (f *l4Forward) acceptCallers() {
	for {
		c, err := f.public.Accept()
		if err != nil {
			return // closed
		}
		f.wg.Go(func() {
			s, err := f.gwSide.Open()
			if err != nil {
				_ = c.Close()
				return
			}
			f.splice(c, s)
		})
	}
}

// acceptStreams is the agent side: each stream gets a connection to the
// service of its own.
func (f *l4Forward) acceptStreams() {
	for {
		s, err := f.agtSide.Accept()
		if err != nil {
			return // closed
		}
		f.wg.Go(func() {
			c, err := net.Dial("tcp", f.service)
			if err != nil {
				_ = s.Close()
				return
			}
			f.splice(s, c)
		})
	}
}

// track records c so that close can cut it; it reports false, having
// closed c, if the forwarder is already closing.
func (f *l4Forward) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		_ = c.Close()
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *l4Forward) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	_ = c.Close()
}

// splice copies a and b into each other until both directions have ended,
// then closes both. A direction that ends cleanly half-closes its
// destination, as a TCP proxy passes on a FIN; one that fails closes both,
// so that the other direction ends too.
func (f *l4Forward) splice(a, b net.Conn) {
	if !f.track(a) {
		_ = b.Close()
		return
	}
	defer f.untrack(a)
	if !f.track(b) {
		return
	}
	defer f.untrack(b)
	var wg sync.WaitGroup
	copyTo := func(dst, src net.Conn) {
		_, err := io.Copy(dst, src)
		if err == nil || errors.Is(err, io.EOF) {
			closeWrite(dst)
			return
		}
		_ = a.Close()
		_ = b.Close()
	}
	wg.Go(func() { copyTo(a, b) })
	wg.Go(func() { copyTo(b, a) })
	wg.Wait()
}

// closeWrite half-closes c: no more bytes will be written, but it may still
// be read.
func closeWrite(c net.Conn) {
	switch c := c.(type) {
	case *net.TCPConn:
		_ = c.CloseWrite()
	case *yamux.Stream:
		_ = c.Close() // a yamux stream's Close sends FIN and leaves reading open
	default:
		_ = c.Close()
	}
}
