package testkit

import (
	"context"
	"net"
	"sync"
)

// PingCounter counts the HTTP/2 PING frames (acknowledgements left out)
// each way on the client connections it dials: a test of flow-control
// windows can tell from them whether either end probes the link. Give its
// Dial to grpc.WithContextDialer.
type PingCounter struct {
	sent, received pingStream
}

// Dial opens a TCP connection to addr whose frames are counted.
func (c *PingCounter) Dial(ctx context.Context, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &pingConn{Conn: conn, counter: c, preface: len(clientPreface)}, nil
}

// Sent is how many PINGs the client sent.
func (c *PingCounter) Sent() int { return c.sent.count() }

// Received is how many PINGs the server sent.
func (c *PingCounter) Received() int { return c.received.count() }

// clientPreface starts every HTTP/2 connection a client opens.
const clientPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// pingConn feeds what crosses one connection to its counter.
type pingConn struct {
	net.Conn
	counter *PingCounter
	preface int // bytes of the client preface still to skip when sending
}

func (c *pingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	sent := p[:n]
	if c.preface > 0 {
		skip := min(c.preface, len(sent))
		c.preface -= skip
		sent = sent[skip:]
	}
	c.counter.sent.feed(sent)
	return n, err
}

func (c *pingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.counter.received.feed(p[:n])
	return n, err
}

// pingStream follows one direction of HTTP/2 connections frame by frame
// and counts their PING frames that are not acknowledgements. A counter
// serves one connection at a time per direction, which is what a test
// with one client connection has.
type pingStream struct {
	mu     sync.Mutex
	header []byte // the part of the next frame header seen so far
	skip   int    // payload bytes of the current frame still to skip
	pings  int
}

func (s *pingStream) feed(p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(p) > 0 {
		if s.skip > 0 {
			n := min(s.skip, len(p))
			s.skip -= n
			p = p[n:]
			continue
		}
		n := min(9-len(s.header), len(p))
		s.header = append(s.header, p[:n]...)
		p = p[n:]
		if len(s.header) < 9 {
			continue
		}
		const typePing, flagAck = 6, 1
		if s.header[3] == typePing && s.header[4]&flagAck == 0 {
			s.pings++
		}
		s.skip = int(s.header[0])<<16 | int(s.header[1])<<8 | int(s.header[2])
		s.header = s.header[:0]
	}
}

func (s *pingStream) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pings
}
