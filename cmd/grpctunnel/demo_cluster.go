package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
	"github.com/grpctunnel/grpctunnel/gateway/cluster"
	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/internal/embedetcd"
)

// demoMaxReplicas bounds demo --replicas: the demo is something to read,
// and past a handful of replicas its account only grows longer.
const demoMaxReplicas = 9

// demoLeaseTTL is the replicas' lease TTL in the cluster demo: the
// shortest etcd grants with its default timings (it raises anything
// shorter to 2s), so that a crashed replica's entries expire while the
// demo runs rather than after the command's 10s default.
const demoLeaseTTL = 2 * time.Second

// demoReplica is one gateway replica of the cluster demo, with the
// demo's own caller connection to it.
type demoReplica struct {
	id   string
	gw   *gatewayServer
	conn *grpc.ClientConn
	// muted silences the replica's log once it is killed: a crashed
	// process says nothing, but the loops of its directory, left running
	// until the end (see crash), would log that etcd is out of reach.
	muted   atomic.Bool
	crashed bool
}

// demoClusterRun is the demo of a cluster (demo --replicas N, N >= 2): an
// embedded etcd, N gateway replicas started as the gateway command starts
// them, and one device service with an agent on replica 1 and another,
// with the same key, on replica 2. It calls through every replica, kills
// replica 1 as a crash would, calls through the others again, and waits
// until replica 1's entries expire from their directories. It stops
// everything it started before it returns.
func demoClusterRun(ctx context.Context, cfg demoConfig, out io.Writer, log *slog.Logger) error {
	devAddr, stopDev, err := startDeviceService(cfg.serviceListen)
	if err != nil {
		return err
	}
	defer stopDev()
	fmt.Fprintf(out, "device service listening on %s (only the agents call it)\n", devAddr)

	// etcd's data and the cluster's token live in a directory of their
	// own, removed once etcd has stopped (deferred calls run last first).
	tmp, err := os.MkdirTemp("", "grpctunnel-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	etcdDir := filepath.Join(tmp, "etcd")
	if err := os.Mkdir(etcdDir, 0o700); err != nil {
		return err
	}
	etcd, err := embedetcd.Start(etcdDir)
	if err != nil {
		return fmt.Errorf("embedded etcd: %w", err)
	}
	defer etcd.Stop()
	fmt.Fprintf(out, "etcd serving on %s, embedded in this process, its data in %s (removed at the end)\n", etcd.URL, tmp)
	tokenFile, err := writeClusterToken(tmp)
	if err != nil {
		return err
	}

	replicas := make([]*demoReplica, cfg.replicas)
	for i := range replicas {
		r := &demoReplica{id: fmt.Sprintf("replica-%d", i+1)}
		gwCfg := defaultGatewayConfig()
		gwCfg.listen = demoFreePort
		gwCfg.cluster.etcd = etcd.URL
		gwCfg.cluster.replicaID = r.id
		gwCfg.cluster.peerListen = demoFreePort
		gwCfg.cluster.tokenFile = tokenFile
		gwCfg.cluster.leaseTTL = demoLeaseTTL
		if r.gw, err = startGateway(gwCfg, slog.New(muteHandler{log.Handler(), &r.muted}).With("part", r.id)); err != nil {
			return fmt.Errorf("%s: %w", r.id, err)
		}
		defer r.stop(ctx)
		if r.conn, err = grpc.NewClient(dialAddr(r.gw.addr), grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
			return err
		}
		replicas[i] = r
		fmt.Fprintf(out, "%s listening on %s for agents and callers, and on %s for the other replicas' forwarded calls\n",
			r.id, r.gw.addr, r.gw.replica.dir.Self().Addr)
	}

	// One agent per replica it is to reach, since an agent of this
	// command dials one gateway address: two agents with one key are what
	// a device with two tunnels looks like to the gateways.
	holders := replicas[:2]
	// agent-1's log is muted once replica 1 is killed: its errors that
	// replica 1 cannot be reached are what the demo says itself.
	var agentMuted atomic.Bool
	for i, r := range holders {
		name := fmt.Sprintf("agent-%d", i+1)
		agLog := log
		if i == 0 {
			agLog = slog.New(muteHandler{log.Handler(), &agentMuted})
		}
		agCfg := defaultAgentConfig()
		agCfg.gateway, agCfg.key, agCfg.target = dialAddr(r.gw.addr), demoKey, dialAddr(devAddr)
		ag, err := startAgent(agCfg, agLog.With("part", name))
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		// Deferred after the replicas' stops, so run before them: their
		// drains find no tunnel left to wait for.
		defer ag.stop(ctx, demoStepTimeout)
		waitCtx, cancel := context.WithTimeout(ctx, demoStepTimeout)
		err = r.gw.g.Agent(demoKey).WaitForReady(waitCtx)
		cancel()
		if err != nil {
			return fmt.Errorf("waiting for %s to open its tunnel to %s: %w", name, r.id, err)
		}
		fmt.Fprintf(out, "%s (key %q) opened a tunnel to %s\n", name, demoKey, r.id)
	}

	// Each replica learns from its copy of the directory, kept by a
	// watch on etcd, which replicas hold the agent: once every copy
	// shows both tunnels, every replica routes calls for it.
	holderIDs := []string{holders[0].id, holders[1].id}
	waitCtx, cancel := context.WithTimeout(ctx, demoStepTimeout)
	defer cancel()
	if err := awaitDirectories(waitCtx, replicas, func(d *cluster.Directory) bool {
		return slices.Equal(replicaIDs(d.Holders(demoKey, false)), holderIDs)
	}); err != nil {
		return fmt.Errorf("waiting for every replica's directory to show agent %q on %s: %w", demoKey, strings.Join(holderIDs, " and "), err)
	}
	fmt.Fprintf(out, "the directory of every replica shows agent %q on %s: a call for it may enter any replica\n",
		demoKey, strings.Join(holderIDs, " and "))

	for _, r := range replicas {
		if err := demoClusterCall(ctx, out, replicas, r); err != nil {
			return err
		}
	}
	if err := printClusterAgents(ctx, out, replicas[len(replicas)-1]); err != nil {
		return err
	}

	victim, survivors := replicas[0], replicas[1:]
	victim.muted.Store(true)
	agentMuted.Store(true)
	killed := time.Now()
	victim.crash()
	fmt.Fprintf(out, "killed %s as a crash would: its ports closed at once, its lease not revoked, so its entries stay in the other replicas' directories until the lease expires (TTL %v)\n",
		victim.id, demoLeaseTTL)
	fmt.Fprintf(out, "agent-1, which knows only %s's address, lost its tunnel and keeps trying there; agent-2's, on %s, carries every call now\n",
		victim.id, holders[1].id)
	for _, r := range survivors {
		if err := demoClusterCall(ctx, out, replicas, r); err != nil {
			return err
		}
	}

	waitCtx, cancel = context.WithTimeout(ctx, demoStepTimeout+demoLeaseTTL)
	defer cancel()
	if err := awaitDirectories(waitCtx, survivors, func(d *cluster.Directory) bool {
		return !slices.Contains(replicaIDs(d.Replicas()), victim.id) &&
			!slices.Contains(replicaIDs(d.Holders(demoKey, false)), victim.id)
	}); err != nil {
		return fmt.Errorf("waiting for %s's entries to expire: %w", victim.id, err)
	}
	fmt.Fprintf(out, "%s's lease expired: its entries left the other replicas' directories %v after the kill (lease TTL %v)\n",
		victim.id, time.Since(killed).Round(100*time.Millisecond), demoLeaseTTL)
	last := replicas[len(replicas)-1]
	if err := demoClusterCall(ctx, out, replicas, last); err != nil {
		return err
	}
	return printClusterAgents(ctx, out, last)
}

// writeClusterToken writes a new random token for the replicas to prove
// to each other that they are replicas, and returns its file.
func writeClusterToken(dir string) (string, error) {
	var b [16]byte
	_, _ = rand.Read(b[:])
	file := filepath.Join(dir, "cluster-token")
	if err := os.WriteFile(file, []byte(hex.EncodeToString(b[:])+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("cluster token: %w", err)
	}
	return file, nil
}

// demoClusterCall calls GetStatus through r and says where the call went:
// served by r's own tunnel, or forwarded to the replica whose tunnel
// carried it, which the gateways' counts of calls on each tunnel tell.
func demoClusterCall(ctx context.Context, out io.Writer, replicas []*demoReplica, r *demoReplica) error {
	ctx, cancel := context.WithTimeout(ctx, demoStepTimeout)
	defer cancel()
	// Dead replicas this one still finds in its directory, as holders of
	// the agent whose calls it forwards.
	var stale []string
	for _, h := range r.gw.replica.dir.Holders(demoKey, true) {
		if i := slices.IndexFunc(replicas, func(o *demoReplica) bool { return o.id == h.ID }); i >= 0 && replicas[i].crashed {
			stale = append(stale, h.ID)
		}
	}
	before := tunnelCalls(replicas)
	st, err := demopb.NewDeviceServiceClient(r.conn).GetStatus(
		metadata.AppendToOutgoingContext(ctx, gateway.DefaultKeyHeader, demoKey), &demopb.GetStatusRequest{})
	if err != nil {
		return fmt.Errorf("GetStatus through %s: %w", r.id, err)
	}
	after := tunnelCalls(replicas)
	var carrier string
	for id, n := range after {
		if n > before[id] {
			carrier = id
		}
	}
	if carrier == "" {
		carrier = "another replica" // not seen: it cannot happen, short of a bug
	}
	answer := fmt.Sprintf("(served_by=%s calls_served=%d)", st.GetServedBy(), st.GetCallsServed())
	switch {
	case carrier == r.id:
		fmt.Fprintf(out, "GetStatus entered %s, which holds a tunnel of %q: served through it %s\n", r.id, demoKey, answer)
	default:
		fmt.Fprintf(out, "GetStatus entered %s, which holds no tunnel of %q: it crossed to %s, which holds one %s\n", r.id, demoKey, carrier, answer)
	}
	if carrier != r.id && len(stale) > 0 {
		// Whether this call tried it first depends on where the
		// replica's turn among the holders stood; what matters is that
		// no call fails for it.
		fmt.Fprintf(out, "  %s's directory still names %s as a holder until the lease expires: a replica skips a holder it cannot reach\n",
			r.id, strings.Join(stale, " and "))
	}
	return nil
}

// tunnelCalls returns, for each live replica, how many calls have started
// on its tunnels of the demo's agent.
func tunnelCalls(replicas []*demoReplica) map[string]uint64 {
	calls := make(map[string]uint64)
	for _, r := range replicas {
		if r.crashed {
			continue
		}
		for _, a := range r.gw.g.Agents() {
			if a.GetKey() != demoKey {
				continue
			}
			for _, t := range a.GetTunnels() {
				calls[r.id] += t.GetStreamsStarted()
			}
		}
	}
	return calls
}

// printClusterAgents prints what AdminService.ListAgents through r says:
// the agents of the whole cluster, since r asks the other replicas, with
// the replica that holds each tunnel.
func printClusterAgents(ctx context.Context, out io.Writer, r *demoReplica) error {
	ctx, cancel := context.WithTimeout(ctx, demoStepTimeout)
	defer cancel()
	resp, err := adminpb.NewAdminServiceClient(r.conn).ListAgents(ctx, &adminpb.ListAgentsRequest{})
	if err != nil {
		return fmt.Errorf("calling AdminService.ListAgents through %s: %w", r.id, err)
	}
	fmt.Fprintf(out, "AdminService.ListAgents through %s (no %s header: it asks every replica, and names the one holding each tunnel):\n",
		r.id, gateway.DefaultKeyHeader)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  KEY\tREPLICA\tAGENT ADDRESS\tCALLS")
	for _, a := range resp.GetAgents() {
		// By replica rather than by age, so that the table reads the
		// same from run to run.
		tunnels := slices.SortedFunc(slices.Values(a.GetTunnels()), func(x, y *adminpb.Tunnel) int {
			return strings.Compare(x.GetReplica(), y.GetReplica())
		})
		for _, t := range tunnels {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\n", a.GetKey(), t.GetReplica(), t.GetPeer(), t.GetStreamsStarted())
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, u := range resp.GetUnreachableReplicas() {
		fmt.Fprintf(out, "  unreachable: %s: %s\n", u.GetReplica(), u.GetError())
	}
	return nil
}

// awaitDirectories waits until ok holds of the directory of every replica,
// woken by each change of a directory rather than polling it.
func awaitDirectories(ctx context.Context, replicas []*demoReplica, ok func(*cluster.Directory) bool) error {
	for _, r := range replicas {
		d := r.gw.replica.dir
		for {
			// Taken before the check, so that no change between the
			// two goes unseen.
			changed := d.Changed()
			if ok(d) {
				break
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return fmt.Errorf("%s: %w", r.id, ctx.Err())
			}
		}
	}
	return nil
}

// replicaIDs returns the ids of rs, in their order.
func replicaIDs(rs []cluster.Replica) []string {
	ids := make([]string, len(rs))
	for i, r := range rs {
		ids[i] = r.ID
	}
	return ids
}

// stop stops the replica: drained as the gateway command does on a
// signal if it is alive, or, if it was killed, what its process would
// have taken with it (see crash).
func (r *demoReplica) stop(ctx context.Context) {
	if r.conn != nil {
		_ = r.conn.Close()
	}
	if !r.crashed {
		r.gw.stop(ctx, demoStepTimeout)
		return
	}
	// The directory's loops are all that is left of a killed replica;
	// Close stops them, and cannot revoke the lease: its client is
	// closed, and the lease has expired anyway.
	closeCtx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = r.gw.replica.dir.Close(closeCtx)
}

// crash kills the replica as a crash of its process would, for the demo:
// its servers close at once, agents' tunnels, callers' calls and the peer
// port alike, and its lease is neither kept alive nor revoked, so that its
// entries stay in the other replicas' directories until the lease's TTL
// runs out. The directory itself is not closed, since Close would revoke
// the lease; its loops are stopped at the end of the demo (see stop).
func (r *demoReplica) crash() {
	r.crashed = true
	rep := r.gw.replica
	// The etcd client goes first: nothing the replica does as it dies may
	// reach etcd, as nothing from a crashed process would. Its tunnels,
	// closing below, would otherwise each delete their entry.
	_ = rep.cli.Close()
	r.gw.srv.Stop()
	<-r.gw.done
	rep.peerSrv.Stop()
	<-rep.done
	rep.peering.Close()
	if r.gw.metrics != nil {
		r.gw.metrics.shutdown()
	}
}

// muteHandler is a log handler that writes nothing once muted is set: the
// demo mutes the parts it kills, or cuts off, whose complaints about it
// would only repeat, out of place, what the demo's own account says.
type muteHandler struct {
	slog.Handler
	muted *atomic.Bool
}

func (h muteHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return !h.muted.Load() && h.Handler.Enabled(ctx, level)
}

func (h muteHandler) Handle(ctx context.Context, rec slog.Record) error {
	if h.muted.Load() {
		return nil // enabled a moment before it was muted
	}
	return h.Handler.Handle(ctx, rec)
}

func (h muteHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return muteHandler{h.Handler.WithAttrs(attrs), h.muted}
}

func (h muteHandler) WithGroup(name string) slog.Handler {
	return muteHandler{h.Handler.WithGroup(name), h.muted}
}
