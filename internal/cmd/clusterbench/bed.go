package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/cluster"
	"github.com/grpctunnel/grpctunnel/internal/benchkit"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
	"github.com/grpctunnel/grpctunnel/internal/window"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// clusterToken is the replicas' shared secret; the bench's callers never
// send it.
const clusterToken = "clusterbench-token"

// openTimeout bounds every wait for something the cluster should do on
// its own (a tunnel to open, an entry to spread), so that a broken cluster
// fails the bench rather than hangs it.
const openTimeout = 30 * time.Second

// quiet discards the replicas' and agents' logs: a line for each tunnel is
// noise in a bench that opens many.
var quiet = slog.New(slog.DiscardHandler)

// insecureCreds is for every connection of the bench, all on loopback.
var insecureCreds = grpc.WithTransportCredentials(insecure.NewCredentials())

// bed is a cluster of gateway replicas on the bench's etcd, under a
// cluster name of its own so that measurements do not see each other's
// entries, with the TestService that its agents forward calls to.
// Everything a bed starts is stopped by close.
type bed struct {
	etcd      *embedetcd.Server
	name      string
	replicas  []*replica
	service   *benchkit.TestService
	toService *grpc.ClientConn // the agents' connection to the service

	cleanups []func() // run last first by close
}

// replica is one gateway replica of a bed: its directory and peering, its
// callers' and agents' port, and its peer port.
type replica struct {
	id      string
	cli     *clientv3.Client
	dir     *cluster.Directory
	g       *gateway.Gateway
	addr    string           // the callers' and agents' address
	callers *grpc.ClientConn // a caller's connection to addr

	// opened holds when each agent key's first tunnel opened here, as
	// the gateway's OnReverseTunnelOpen saw it.
	opened sync.Map // string → time.Time
}

// startBed starts n replicas of cluster name on etcd, called gw-a, gw-b...,
// and the TestService, and returns once every replica sees all the others.
func startBed(ctx context.Context, etcd *embedetcd.Server, name string, n int) (b *bed, err error) {
	b = &bed{etcd: etcd, name: name}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if b.service, err = benchkit.StartTestService(); err != nil {
		return nil, err
	}
	b.onClose(b.service.Stop)
	if b.toService, err = b.dial(b.service.Addr, agent.DialOptions(0)...); err != nil {
		return nil, err
	}
	for i := range n {
		r, err := b.startReplica(ctx, fmt.Sprintf("gw-%c", 'a'+i))
		if err != nil {
			return nil, err
		}
		b.replicas = append(b.replicas, r)
	}
	for _, r := range b.replicas {
		if _, err := waitDir(ctx, r.dir, func() bool { return len(r.dir.Replicas()) == n }); err != nil {
			return nil, fmt.Errorf("%s waiting for the %d replicas: %w", r.id, n, err)
		}
	}
	return b, nil
}

// startReplica starts replica id as the grpctunnel command does, without
// TLS: it joins the directory with the address of its peer port, dials the
// other replicas with the agents' window options, and serves its callers'
// port and its peer port.
func (b *bed) startReplica(ctx context.Context, id string) (*replica, error) {
	r := &replica{id: id}
	var err error
	if r.cli, err = b.etcd.Client(); err != nil {
		return nil, err
	}
	b.onClose(func() { _ = r.cli.Close() })
	peerLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = peerLis.Close()
		return nil, err
	}
	r.addr = lis.Addr().String()
	joinCtx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	r.dir, err = cluster.Join(joinCtx, r.cli, cluster.Options{
		Cluster: b.name, ReplicaID: id, Addr: peerLis.Addr().String(), Logger: quiet,
	})
	if err != nil {
		_ = peerLis.Close()
		_ = lis.Close()
		return nil, err
	}
	b.onClose(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = r.dir.Close(ctx)
	})
	peering := cluster.NewPeering(r.dir, append(window.DialOptions(0), insecureCreds)...)
	b.onClose(peering.Close)
	r.g, err = gateway.New(gateway.Options{
		Cluster: peering, ClusterToken: clusterToken, Logger: quiet,
		Tunnel: tunnel.TunnelServiceHandlerOptions{OnReverseTunnelOpen: func(t tunnel.TunnelChannel) {
			now := time.Now()
			if keys := metadata.ValueFromIncomingContext(t.Context(), gateway.DefaultKeyHeader); len(keys) == 1 {
				r.opened.LoadOrStore(keys[0], now)
			}
		}},
	})
	if err != nil {
		_ = peerLis.Close()
		_ = lis.Close()
		return nil, err
	}
	srv := grpc.NewServer(r.g.ServerOptions()...)
	r.g.Register(srv)
	peerSrv := grpc.NewServer(r.g.PeerServerOptions()...)
	var served sync.WaitGroup
	served.Go(func() { _ = srv.Serve(lis) })
	served.Go(func() { _ = peerSrv.Serve(peerLis) })
	b.onClose(func() { srv.Stop(); peerSrv.Stop(); served.Wait() })
	if r.callers, err = b.dial(r.addr); err != nil {
		return nil, err
	}
	return r, nil
}

// openedAt returns when the first tunnel of key opened on r.
func (r *replica) openedAt(key string) (time.Time, bool) {
	v, ok := r.opened.Load(key)
	if !ok {
		return time.Time{}, false
	}
	return v.(time.Time), true
}

// holds reports whether r's directory names replica holder among the
// holders of key.
func (r *replica) holds(key, holder string) bool {
	return slices.ContainsFunc(r.dir.Holders(key, false), func(h cluster.Replica) bool { return h.ID == holder })
}

// startAgent starts an agent with key and one tunnel on replica r, as
// the grpctunnel command's agent does, forwarding calls to the bed's
// service. onOpen, if set, is called as each of its tunnels opens. stop
// ends the agent and waits for it.
func (b *bed) startAgent(ctx context.Context, r *replica, key string, onOpen func()) (stop func(), err error) {
	toGateway, err := grpc.NewClient(r.addr, append(agent.DialOptions(0), insecureCreds)...)
	if err != nil {
		return nil, err
	}
	a, err := agent.New(toGateway, b.toService, agent.Options{
		Key:    key,
		Logger: quiet,
		Reconnect: tunnel.ReconnectOptions{Tunnels: 1, OnStateChange: func(c tunnel.StateChange) {
			if c.State == tunnel.TunnelOpen && onOpen != nil {
				onOpen()
			}
		}},
	})
	if err != nil {
		_ = toGateway.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = a.Run(ctx)
	}()
	return func() {
		a.Stop()
		<-done
		_ = toGateway.Close()
	}, nil
}

// onClose arranges for f to run when the bed closes, before whatever was
// arranged earlier.
func (b *bed) onClose(f func()) { b.cleanups = append(b.cleanups, f) }

// close stops every replica, connection and server of the bed, last
// started first, and returns once their goroutines are done.
func (b *bed) close() {
	for i := len(b.cleanups) - 1; i >= 0; i-- {
		b.cleanups[i]()
	}
	b.cleanups = nil
}

// dial opens a client connection to addr, closed with the bed.
func (b *bed) dial(addr string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, append(opts, insecureCreds)...)
	if err != nil {
		return nil, err
	}
	b.onClose(func() { _ = conn.Close() })
	return conn, nil
}

// waitDir waits, on d's Changed signal rather than by polling, until cond
// holds, and returns when it was first seen to.
func waitDir(ctx context.Context, d *cluster.Directory, cond func() bool) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, openTimeout)
	defer cancel()
	for {
		// Taken before cond is read, so that no change goes unseen.
		changed := d.Changed()
		if cond() {
			return time.Now(), nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}

// unaryPayload is the size of unary requests and responses: small, so that
// latency and call rates show the per-call overhead rather than copying.
const unaryPayload = 64

// unaryCall makes one UnaryCall with unaryPayload bytes each way through
// cc and checks the answer.
func unaryCall(ctx context.Context, cc grpc.ClientConnInterface) error {
	resp, err := testgrpc.NewTestServiceClient(cc).UnaryCall(ctx, unaryRequest)
	if err != nil {
		return err
	}
	if n := len(resp.GetPayload().GetBody()); n != unaryPayload {
		return fmt.Errorf("response of %d bytes, want %d", n, unaryPayload)
	}
	return nil
}

var unaryRequest = &testgrpc.SimpleRequest{
	ResponseType: testgrpc.PayloadType_COMPRESSABLE,
	ResponseSize: unaryPayload,
	Payload:      &testgrpc.Payload{Body: make([]byte, unaryPayload)},
}

// revision returns etcd's current revision, which every write (a Put, a
// Delete, a transaction that changes something, a revoked lease with keys)
// moves on by one, and nothing else does.
func revision(ctx context.Context, cli *clientv3.Client) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	r, err := cli.Get(ctx, "/clusterbench-revision-probe")
	if err != nil {
		return 0, err
	}
	return r.Header.Revision, nil
}
