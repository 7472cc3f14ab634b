package window

import (
	"context"
	"net"
	"sync"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestSizes(t *testing.T) {
	for _, tc := range []struct {
		size         int
		stream, conn int32
		fixed        bool
	}{
		{size: 0, stream: Default, conn: 2 * Default, fixed: true},
		{size: -1},
		{size: 1 << 20, stream: 1 << 20, conn: 2 << 20, fixed: true},
		{size: 1, stream: minWindow, conn: 2 * minWindow, fixed: true},
		{size: 1 << 40, stream: 1<<30 - 1, conn: 1<<31 - 2, fixed: true},
	} {
		stream, conn, fixed := sizes(tc.size)
		if stream != tc.stream || conn != tc.conn || fixed != tc.fixed {
			t.Errorf("sizes(%d) = %d, %d, %v; want %d, %d, %v", tc.size, stream, conn, fixed, tc.stream, tc.conn, tc.fixed)
		}
	}
}

// TestFixedWindowsSendNoProbes makes sequential calls between a server
// and a client configured alike and counts the PING frames each sends: with
// gRPC's dynamic windows every call costs one or more, with fixed ones
// none, which is the point of the package.
func TestFixedWindowsSendNoProbes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size      int
		wantPings bool
	}{
		{"fixed", 0, false},
		{"dynamic", -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clientPings, serverPings := pingsDuringCalls(t, tc.size, 20)
			if got := clientPings+serverPings > 0; got != tc.wantPings {
				t.Fatalf("PINGs during 20 calls: client %d, server %d; want some: %v", clientPings, serverPings, tc.wantPings)
			}
		})
	}
}

// pingsDuringCalls serves health with windows of size, makes calls
// sequential Check calls, and returns how many PING frames (acknowledgements
// left out) the client and the server sent.
func pingsDuringCalls(t *testing.T, size, calls int) (clientPings, serverPings int) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(ServerOptions(size)...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	defer func() { srv.Stop(); <-served }()

	var sent, received pingCounter
	sent.preface = len("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, sent: &sent, received: &received}, nil
	}
	opts := append(DialOptions(size), grpc.WithContextDialer(dial), grpc.WithTransportCredentials(insecure.NewCredentials()))
	conn, err := grpc.NewClient("passthrough:///"+lis.Addr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	for range calls {
		if _, err := client.Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	return sent.count(), received.count()
}

// countingConn counts the PING frames written and read on a client's
// connection.
type countingConn struct {
	net.Conn
	sent, received *pingCounter
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.sent.feed(p[:n])
	return n, err
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.received.feed(p[:n])
	return n, err
}

// pingCounter follows one direction of an HTTP/2 connection frame by frame
// and counts its PING frames that are not acknowledgements.
type pingCounter struct {
	mu      sync.Mutex
	preface int    // bytes of client preface still to skip
	header  []byte // the part of the next frame header seen so far
	skip    int    // payload bytes of the current frame still to skip
	pings   int
}

func (c *pingCounter) feed(p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(p) > 0 {
		switch {
		case c.preface > 0:
			n := min(c.preface, len(p))
			c.preface -= n
			p = p[n:]
		case c.skip > 0:
			n := min(c.skip, len(p))
			c.skip -= n
			p = p[n:]
		default:
			n := min(9-len(c.header), len(p))
			c.header = append(c.header, p[:n]...)
			p = p[n:]
			if len(c.header) < 9 {
				continue
			}
			const typePing, flagAck = 6, 1
			if c.header[3] == typePing && c.header[4]&flagAck == 0 {
				c.pings++
			}
			c.skip = int(c.header[0])<<16 | int(c.header[1])<<8 | int(c.header[2])
			c.header = c.header[:0]
		}
	}
}

func (c *pingCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pings
}
