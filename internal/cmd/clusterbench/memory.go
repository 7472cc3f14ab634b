package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/grpctunnel/grpctunnel/gateway/cluster"
	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// Every replica keeps the whole directory in memory, so its size bounds
// how many agents a cluster can hold. The memory row measures it on a
// replica that only watches: one replica writes the entries, another
// receives them. The etcd member in this process keeps memory for every key
// as well, as would the writing replica for its own tunnels, so the
// observing replica runs alone in a child process of this same binary: the
// bench binary run again with observerEnv set to "<etcd URL> <cluster>". It
// talks to the parent in lines of text:
//
//	child:  ready                 once it has joined the cluster
//	parent: before                when no entry is written yet
//	child:  ok                    once it has read its heap
//	parent: after REPLICA N       once N entries of REPLICA are written
//	child:  heap DIRECTORY MAP    its heap growth in bytes, see serveObserver
//	        or: error MESSAGE
//
// and leaves the cluster and exits when its standard input ends.

// observerEnv, set in the environment, makes the bench binary the
// observing replica of the memory row instead of the bench.
const observerEnv = "CLUSTERBENCH_OBSERVER"

// memoryCluster is the cluster of the memory row.
const memoryCluster = "bench-memory"

// memoryAgentKey is the key of the i-th agent in the memory row: a short
// key, as a site or device name would be.
func memoryAgentKey(i int) string { return fmt.Sprintf("agent-%05d", i) }

// memorySection measures the heap each directory entry costs a replica,
// and returns its row.
func memorySection(ctx context.Context, cfg config, etcd *embedetcd.Server, say func(string, ...any)) []*row {
	n := cfg.entries
	perEntry := &row{
		label:  fmt.Sprintf("heap per directory entry, %s entries, on a replica watching them: vs a plain map of their etcd keys ↓", benchkit.Thousands(float64(n))),
		format: formatBytes,
		goal:   atMost(1024, formatBytes),
	}
	dir, plain, err := directoryHeap(ctx, etcd, n, say)
	if err != nil {
		perEntry.set(0, err)
		perEntry.setBase(0, err)
		return []*row{perEntry}
	}
	perEntry.set(float64(dir)/float64(n), nil)
	perEntry.setBase(float64(plain)/float64(n), nil)
	return []*row{perEntry}
}

// directoryHeap writes n tunnel entries, one agent each, from a replica in
// this process and returns the heap growth of an observing replica in a
// child process once its directory shows them all, and that of a plain map
// of the same keys in the same child.
func directoryHeap(ctx context.Context, etcd *embedetcd.Server, n int, say func(string, ...any)) (dir, plain int64, err error) {
	cli, err := etcd.Client()
	if err != nil {
		return 0, 0, err
	}
	defer cli.Close()
	joinCtx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	// The writer has no peer port: no call is made in this row, so its
	// address is never dialled.
	writer, err := cluster.Join(joinCtx, cli, cluster.Options{Cluster: memoryCluster, ReplicaID: "gw-writer", Addr: "127.0.0.1:1", Logger: quiet})
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		// Revoking the lease deletes all n entries at once.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = writer.Close(ctx)
	}()

	say("memory: an observing replica in a child process")
	obs, err := startObserver(ctx, etcd.URL)
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		if cerr := obs.close(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	if _, err := obs.ask("before"); err != nil {
		return 0, 0, err
	}
	say("memory: writing %d entries", n)
	for i := range n {
		// Tunnel ids as cluster.Peering numbers its tunnels.
		if _, err := writer.AddTunnel(memoryAgentKey(i), "t"+strconv.Itoa(i+1)); err != nil {
			return 0, 0, err
		}
	}
	reply, err := obs.ask(fmt.Sprintf("after %s %d", writer.Self().ID, n))
	if err != nil {
		return 0, 0, err
	}
	if _, err := fmt.Sscanf(reply, "heap %d %d", &dir, &plain); err != nil {
		return 0, 0, fmt.Errorf("the observer said %q: %w", reply, err)
	}
	return dir, plain, nil
}

// observer is the parent's end of the observing replica's process.
type observer struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *bufio.Scanner
	stderr bytes.Buffer // read only after cmd.Wait
}

// startObserver starts this binary again as the observing replica of the
// memory row's cluster on the etcd at url, and returns once it has joined.
// ctx's end kills it.
func startObserver(ctx context.Context, url string) (*observer, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	o := &observer{cmd: exec.CommandContext(ctx, exe)}
	o.cmd.Env = append(os.Environ(), observerEnv+"="+url+" "+memoryCluster)
	o.cmd.Stderr = &o.stderr
	if o.stdin, err = o.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := o.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := o.cmd.Start(); err != nil {
		return nil, err
	}
	o.lines = bufio.NewScanner(stdout)
	if line, err := o.reply(); err != nil || line != "ready" {
		if err == nil {
			err = fmt.Errorf("the observer said %q, want ready", line)
		}
		if cerr := o.close(); cerr != nil {
			err = fmt.Errorf("%w (%w)", err, cerr)
		}
		return nil, err
	}
	return o, nil
}

// ask sends the observer a command and returns its reply.
func (o *observer) ask(command string) (string, error) {
	if _, err := fmt.Fprintln(o.stdin, command); err != nil {
		return "", err
	}
	line, err := o.reply()
	if err != nil {
		return "", err
	}
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		return "", fmt.Errorf("observer: %s", msg)
	}
	return line, nil
}

// reply reads the observer's next line.
func (o *observer) reply() (string, error) {
	if o.lines.Scan() {
		return o.lines.Text(), nil
	}
	if err := o.lines.Err(); err != nil {
		return "", err
	}
	return "", errors.New("the observer ended without replying")
}

// close ends the observer's input, on which it leaves the cluster and
// exits, and waits for it.
func (o *observer) close() error {
	_ = o.stdin.Close()
	if err := o.cmd.Wait(); err != nil {
		return fmt.Errorf("observer: %w: %s", err, strings.TrimSpace(o.stderr.String()))
	}
	return nil
}

// serveObserver is the observing replica, in its own process: it joins the
// cluster that spec names ("<etcd URL> <cluster>") and answers the
// parent's commands from in on out until in ends.
//
// For "after", the directory's figure is the growth of the live heap from
// "before" until the directory shows the n entries; the plain map's is the
// further growth when the process also keeps every key of the directory,
// read with one Get, mapped to its value. Both are read after
// runtime.GC, as HeapAlloc: what is reachable, not what the runtime holds
// (see steadyHeap).
func serveObserver(spec string, in io.Reader, out io.Writer) error {
	url, name, ok := strings.Cut(spec, " ")
	if !ok {
		return fmt.Errorf("%s=%q, want \"<etcd URL> <cluster>\"", observerEnv, spec)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	// Like the writer, the observer serves no peer port.
	dir, err := cluster.Join(ctx, cli, cluster.Options{Cluster: name, ReplicaID: "gw-observer", Addr: "127.0.0.1:1", Logger: quiet})
	if err != nil {
		return err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = dir.Close(ctx)
	}()
	if _, err := fmt.Fprintln(out, "ready"); err != nil {
		return err
	}
	var before uint64
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		var reply string
		switch f := strings.Fields(sc.Text()); {
		case len(f) == 1 && f[0] == "before":
			before = steadyHeap()
			reply = "ok"
		case len(f) == 3 && f[0] == "after":
			n, err := strconv.Atoi(f[2])
			if err == nil {
				var dirHeap, mapHeap int64
				dirHeap, mapHeap, err = observe(dir, cli, name, f[1], n, before)
				reply = fmt.Sprintf("heap %d %d", dirHeap, mapHeap)
			}
			if err != nil {
				reply = "error " + strings.ReplaceAll(err.Error(), "\n", " ")
			}
		default:
			return fmt.Errorf("unknown command %q", sc.Text())
		}
		if _, err := fmt.Fprintln(out, reply); err != nil {
			return err
		}
	}
	return sc.Err()
}

// observe waits until dir shows n tunnel entries of replica and returns
// the heap growth since before, then the further growth of a plain map of
// the directory's keys and values.
func observe(dir *cluster.Directory, cli *clientv3.Client, name, replica string, n int, before uint64) (dirHeap, mapHeap int64, err error) {
	if _, err := waitDir(context.Background(), dir, func() bool { return dir.TunnelsOf(replica) >= n }); err != nil {
		return 0, 0, fmt.Errorf("%d of %d entries seen: %w", dir.TunnelsOf(replica), n, err)
	}
	withDir := steadyHeap()
	plain, err := plainCopy(cli, name)
	if err != nil {
		return 0, 0, err
	}
	withMap := steadyHeap()
	runtime.KeepAlive(plain)
	return int64(withDir) - int64(before), int64(withMap) - int64(withDir), nil
}

// plainCopy reads the whole directory of cluster name with one Get and
// returns a map of its keys to their values: the least a replica could
// keep. The map is grown as entries come, as a replica's copy would be,
// and holds copies, so that the response's buffers are not kept with it.
func plainCopy(cli *clientv3.Client, name string) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	get, err := cli.Get(ctx, "/"+name+"/", clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	plain := make(map[string]string)
	for _, kv := range get.Kvs {
		plain[string(kv.Key)] = string(kv.Value)
	}
	return plain, nil
}

// steadyHeap returns the steady live heap: the least of several readings
// of liveHeap, steadyReadings of them steadyEvery apart. An idle replica
// still talks to etcd (its health probe, its lease's keepalives), and a
// request in flight during a reading counts a few tens of KiB, as do the
// buffers its start leaves for a moment after Join; such transients only
// ever add to the live heap, so the least reading is the heap the replica
// keeps.
func steadyHeap() uint64 {
	least := liveHeap()
	for range steadyReadings - 1 {
		time.Sleep(steadyEvery)
		least = min(least, liveHeap())
	}
	return least
}

const (
	steadyReadings = 10
	steadyEvery    = 25 * time.Millisecond
)

// liveHeap returns the bytes of reachable heap objects: HeapAlloc right
// after a collection. Two collections, since the first leaves what
// sync.Pool's victim caches hold.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
