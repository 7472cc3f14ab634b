package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// A process's resident memory cannot be split between the things in it, so
// the gateway's memory rows run the server in a child process of this same
// binary, with nothing else in it, while its clients stay in the parent.
// The child is the bench binary run again with childEnv naming the kind of
// server; it talks to the parent in lines of text:
//
//	child:  addr HOST:PORT       once, when the server is listening
//	parent: measure N            when N things should be open (see below)
//	child:  mem RSS HEAP GOROUTINES
//	        or: error MESSAGE
//
// and stops its server and exits when its standard input ends. What it
// counts for "measure N" is what each client opens on the server: the
// gateway counts agents' tunnels, the bare gRPC server streams, the L4
// forwarder's gateway side yamux sessions.

// childEnv, set in the environment, makes the bench binary a child server
// of the kind it names instead of the bench.
const childEnv = "TUNNELBENCH_CHILD"

// childKind is the kind of child server that plays target t's part in the
// memory rows.
func childKind(t target) string {
	switch t {
	case direct:
		return "grpc"
	case viaGateway:
		return "gateway"
	case viaL4:
		return "l4"
	}
	return t.String()
}

// childServer is a server in a child process.
type childServer interface {
	// open is how many things the server holds open now.
	open() int
	// stop stops the server and returns once it has ended.
	stop()
}

// serveChild runs the child server of kind on a loopback port and answers
// the parent's commands from in on out until in ends.
func serveChild(kind string, in io.Reader, out io.Writer) error {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	var srv childServer
	switch kind {
	case "gateway":
		srv, err = startGatewayChild(lis)
	case "grpc":
		srv = startGRPCChild(lis)
	case "l4":
		srv = startL4Child(lis)
	default:
		err = fmt.Errorf("unknown kind of child server %q", kind)
	}
	if err != nil {
		_ = lis.Close()
		return err
	}
	defer srv.stop()
	if _, err := fmt.Fprintf(out, "addr %s\n", lis.Addr()); err != nil {
		return err
	}
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		arg, ok := strings.CutPrefix(sc.Text(), "measure ")
		if !ok {
			return fmt.Errorf("unknown command %q", sc.Text())
		}
		var reply string
		n, err := strconv.Atoi(arg)
		if err == nil {
			err = waitOpen(srv, n)
		}
		if err != nil {
			reply = "error " + strings.ReplaceAll(err.Error(), "\n", " ")
		} else {
			m := measureProcess()
			reply = fmt.Sprintf("mem %d %d %d", m.rss, m.heap, m.goroutines)
		}
		if _, err := fmt.Fprintln(out, reply); err != nil {
			return err
		}
	}
	return sc.Err()
}

// waitOpen waits until srv holds at least n things open.
func waitOpen(srv childServer, n int) error {
	deadline := time.Now().Add(openTimeout)
	for srv.open() < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d open after %v, want %d", srv.open(), openTimeout, n)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// processMemory is what the child process holds at one moment.
type processMemory struct {
	rss        uint64 // resident set, from the kernel
	heap       uint64 // HeapInuse
	goroutines int
}

// measureProcess waits for the goroutine count to settle, collects
// garbage and returns the freed memory to the kernel, then reads the
// resident set and the heap in use. Returning freed memory first makes the
// resident set reflect what is live rather than when the runtime last
// scavenged.
func measureProcess() processMemory {
	settle()
	runtime.GC()
	debug.FreeOSMemory() // a second collection, then every free page back to the kernel
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return processMemory{rss: residentSet(), heap: ms.HeapInuse, goroutines: runtime.NumGoroutine()}
}

// residentSet returns the process's resident set in bytes, VmRSS as Linux
// reports it, or 0 where that is not available.
func residentSet() uint64 {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range bytes.Lines(status) {
		rest, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		f := strings.Fields(string(rest)) // "1234", "kB"
		if len(f) == 2 && f[1] == "kB" {
			kb, err := strconv.ParseUint(f[0], 10, 64)
			if err == nil {
				return kb << 10
			}
		}
	}
	return 0
}

// gatewayChild is a gateway, built as in the timed rows; it counts the
// agents' tunnels.
type gatewayChild struct {
	tunnels atomic.Int64
	stopper func()
}

func startGatewayChild(lis net.Listener) (*gatewayChild, error) {
	c := &gatewayChild{}
	_, stop, err := newGateway(lis, gateway.Options{Tunnel: tunnel.TunnelServiceHandlerOptions{
		OnReverseTunnelOpen:  func(tunnel.TunnelChannel) { c.tunnels.Add(1) },
		OnReverseTunnelClose: func(tunnel.TunnelChannel) { c.tunnels.Add(-1) },
	}})
	if err != nil {
		return nil, err
	}
	c.stopper = stop
	return c, nil
}

func (c *gatewayChild) open() int { return int(c.tunnels.Load()) }
func (c *gatewayChild) stop()     { c.stopper() }

// grpcChild is a bare gRPC server with the TestService, which counts the
// streams its handlers hold open.
type grpcChild struct {
	streams atomic.Int64
	server  *grpc.Server
	served  chan struct{}
}

func startGRPCChild(lis net.Listener) *grpcChild {
	c := &grpcChild{served: make(chan struct{})}
	c.server = grpc.NewServer(grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		c.streams.Add(1)
		defer c.streams.Add(-1)
		return handler(srv, ss)
	}))
	testgrpc.RegisterTestServiceServer(c.server, interop.NewTestServer())
	go func() {
		defer close(c.served)
		_ = c.server.Serve(lis)
	}()
	return c
}

func (c *grpcChild) open() int { return int(c.streams.Load()) }
func (c *grpcChild) stop()     { c.server.Stop(); <-c.served }

// l4Child is the gateway side of L4 forwarding: it accepts agents'
// connections and runs a yamux session on each, as l4Forward's gateway side
// does, ready to open streams to them.
type l4Child struct {
	lis net.Listener
	wg  sync.WaitGroup

	mu       sync.Mutex
	sessions []*yamux.Session
}

func startL4Child(lis net.Listener) *l4Child {
	c := &l4Child{lis: lis}
	c.wg.Go(func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return // closed
			}
			s, err := yamux.Server(conn, l4Config())
			if err != nil {
				_ = conn.Close()
				continue
			}
			c.mu.Lock()
			c.sessions = append(c.sessions, s)
			c.mu.Unlock()
		}
	})
	return c
}

func (c *l4Child) open() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sessions)
}

func (c *l4Child) stop() {
	_ = c.lis.Close()
	c.wg.Wait()
	for _, s := range c.sessions {
		_ = s.Close()
	}
}
