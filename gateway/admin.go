package gateway

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway/adminpb"
)

// clusterListTimeout bounds how long ListAgents waits for the other
// replicas when the caller set no deadline: a replica that does not answer
// is reported as unreachable rather than holding the answer back.
const clusterListTimeout = 5 * time.Second

// adminService answers the gateway's AdminService.
type adminService struct {
	adminpb.UnimplementedAdminServiceServer
	g *Gateway
}

// ListAgents lists this replica's agents and, unless another replica is
// the one asking, those of every other replica of the cluster, asked at
// once on their peer ports.
func (a *adminService) ListAgents(ctx context.Context, req *adminpb.ListAgentsRequest) (*adminpb.ListAgentsResponse, error) {
	g := a.g
	resp := &adminpb.ListAgentsResponse{Agents: g.agents.list(req.GetKey(), g.self())}
	// Only the peer port lets a call with the peer header through: the
	// replica asking will ask the others itself.
	if g.cluster == nil || len(metadata.ValueFromIncomingContext(ctx, PeerHeader)) > 0 {
		return resp, nil
	}
	peers := g.cluster.Replicas()
	if len(peers) == 0 {
		return resp, nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, clusterListTimeout)
		defer cancel()
	}
	// The caller's metadata stays here: the other replicas need only the
	// cluster's token.
	ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs(PeerHeader, g.clusterToken()))
	answers := make([]*adminpb.ListAgentsResponse, len(peers))
	failures := make([]error, len(peers))
	var wg sync.WaitGroup
	for i, p := range peers {
		wg.Go(func() {
			answers[i], failures[i] = adminpb.NewAdminServiceClient(p.Conn).ListAgents(ctx, req)
		})
	}
	wg.Wait()
	for i, p := range peers {
		if err := failures[i]; err != nil {
			resp.UnreachableReplicas = append(resp.UnreachableReplicas, &adminpb.ReplicaFailure{
				Replica: p.ID, Error: status.Convert(err).Message(),
			})
			continue
		}
		resp.Agents = mergeAgents(resp.Agents, answers[i].GetAgents())
	}
	return resp, nil
}

// mergeAgents adds more to agents, one entry per key sorted by key, each
// key's tunnels oldest first whichever replica holds them.
func mergeAgents(agents, more []*adminpb.Agent) []*adminpb.Agent {
	for _, m := range more {
		i, found := slices.BinarySearchFunc(agents, m.GetKey(), func(a *adminpb.Agent, key string) int {
			return cmp.Compare(a.GetKey(), key)
		})
		if !found {
			agents = slices.Insert(agents, i, m)
			continue
		}
		a := agents[i]
		a.Tunnels = append(a.Tunnels, m.GetTunnels()...)
		slices.SortStableFunc(a.Tunnels, func(x, y *adminpb.Tunnel) int {
			return x.GetOpenedAt().AsTime().Compare(y.GetOpenedAt().AsTime())
		})
	}
	return agents
}
