package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/grpctunnel/grpctunnel/agent"
)

// serverCost is what one client costs a server's process, measured in a
// process of its own (see child.go).
type serverCost struct {
	rss        float64 // resident set, bytes
	heap       float64 // heap in use, bytes
	goroutines float64
}

// serverMemory measures what each of n clients costs the server of target
// t, in a child process: for the gateway, an agent with a connection of its
// own and agentTunnels tunnels; for direct gRPC, a connection with one idle
// stream, the least a client that the server could call back would hold;
// for L4 forwarding, an agent side's connection with its yamux session.
// The clients run here, so the figures are the server's alone.
func serverMemory(ctx context.Context, t target, n int) (cost serverCost, err error) {
	c, err := startChild(ctx, childKind(t))
	if err != nil {
		return serverCost{}, err
	}
	defer func() {
		if cerr := c.close(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	clients := &memoryClients{t: t, addr: c.addr}
	clients.ctx, clients.cancel = context.WithCancel(ctx)
	defer clients.close() // before the child, so that none sees its server go

	// One client first, so that what the server builds once is in place
	// before the first reading.
	if err := clients.open(1); err != nil {
		return serverCost{}, fmt.Errorf("warm-up client: %w", err)
	}
	before, err := c.measure(clients.things())
	if err != nil {
		return serverCost{}, err
	}
	if err := clients.open(n); err != nil {
		return serverCost{}, err
	}
	after, err := c.measure(clients.things())
	if err != nil {
		return serverCost{}, err
	}
	per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	return serverCost{
		rss:        per(after.rss, before.rss),
		heap:       per(after.heap, before.heap),
		goroutines: float64(after.goroutines-before.goroutines) / float64(n),
	}, nil
}

// child is the parent's end of a child server process.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *bufio.Scanner
	stderr bytes.Buffer // read only after cmd.Wait
	addr   string       // where the server listens
}

// startChild starts this binary again as a child server of kind and
// returns once the server is listening. ctx's end kills the child.
func startChild(ctx context.Context, kind string) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	c := &child{cmd: exec.CommandContext(ctx, exe)}
	c.cmd.Env = append(os.Environ(), childEnv+"="+kind)
	c.cmd.Stderr = &c.stderr
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	c.lines = bufio.NewScanner(stdout)
	line, err := c.reply()
	if err == nil {
		var ok bool
		if c.addr, ok = strings.CutPrefix(line, "addr "); !ok {
			err = fmt.Errorf("the child server said %q, want its address", line)
		}
	}
	if err != nil {
		if cerr := c.close(); cerr != nil {
			err = fmt.Errorf("%w (%w)", err, cerr)
		}
		return nil, err
	}
	return c, nil
}

// reply reads the child's next line.
func (c *child) reply() (string, error) {
	if c.lines.Scan() {
		return c.lines.Text(), nil
	}
	if err := c.lines.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("the child server ended without replying")
}

// measure has the child wait until its server holds n things open and
// returns what its process holds then.
func (c *child) measure(n int) (processMemory, error) {
	if _, err := fmt.Fprintf(c.stdin, "measure %d\n", n); err != nil {
		return processMemory{}, err
	}
	line, err := c.reply()
	if err != nil {
		return processMemory{}, err
	}
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		return processMemory{}, fmt.Errorf("child server: %s", msg)
	}
	var m processMemory
	if _, err := fmt.Sscanf(line, "mem %d %d %d", &m.rss, &m.heap, &m.goroutines); err != nil {
		return processMemory{}, fmt.Errorf("the child server said %q: %w", line, err)
	}
	if m.rss == 0 {
		return processMemory{}, fmt.Errorf("the child server cannot read its resident set")
	}
	return m, nil
}

// close ends the child's input, on which it stops its server and exits,
// and waits for it.
func (c *child) close() error {
	_ = c.stdin.Close()
	if err := c.cmd.Wait(); err != nil {
		return fmt.Errorf("child server: %w: %s", err, strings.TrimSpace(c.stderr.String()))
	}
	return nil
}

// memoryClients are the clients of a memory measurement, all of target t's
// kind, connected to the child server at addr.
type memoryClients struct {
	t      target
	addr   string
	ctx    context.Context // ends the agents and streams
	cancel context.CancelFunc

	opened    int
	closers   []func() // run last first by close
	toService *grpc.ClientConn
}

// things is how many things the clients opened on the server, as the
// child counts them.
func (m *memoryClients) things() int {
	if m.t == viaGateway {
		return m.opened * agentTunnels
	}
	return m.opened
}

// open connects n more clients. Agents open their tunnels on their own
// time; the child waits for them.
func (m *memoryClients) open(n int) error {
	for range n {
		if err := m.openOne(); err != nil {
			return fmt.Errorf("client %d: %w", m.opened+1, err)
		}
		m.opened++
	}
	return nil
}

func (m *memoryClients) openOne() error {
	switch m.t {
	case viaGateway:
		if m.toService == nil {
			// No call is made in these rows, so the agents' target is a
			// connection that never connects.
			conn, err := grpc.NewClient("passthrough:///unused", insecureCreds)
			if err != nil {
				return err
			}
			m.toService = conn
			m.closers = append(m.closers, func() { _ = conn.Close() })
		}
		conn, err := grpc.NewClient(m.addr, append(agent.DialOptions(0), insecureCreds)...)
		if err != nil {
			return err
		}
		m.closers = append(m.closers, func() { _ = conn.Close() })
		stop, err := runAgent(m.ctx, conn, m.toService, fmt.Sprintf("agent-%d", m.opened))
		if err != nil {
			return err
		}
		m.closers = append(m.closers, stop)
	case direct:
		conn, err := grpc.NewClient(m.addr, insecureCreds)
		if err != nil {
			return err
		}
		m.closers = append(m.closers, func() { _ = conn.Close() })
		if _, err := testgrpc.NewTestServiceClient(conn).FullDuplexCall(m.ctx); err != nil {
			return err
		}
	case viaL4:
		conn, err := net.Dial("tcp", m.addr)
		if err != nil {
			return err
		}
		s, err := yamux.Client(conn, l4Config())
		if err != nil {
			_ = conn.Close()
			return err
		}
		m.closers = append(m.closers, func() { _ = s.Close() })
	default:
		return fmt.Errorf("no memory measurement for %v", m.t)
	}
	return nil
}

// close ends every client and returns once their goroutines are done.
func (m *memoryClients) close() {
	m.cancel()
	for i := len(m.closers) - 1; i >= 0; i-- {
		m.closers[i]()
	}
	m.closers = nil
}
