package gateway

import (
	"context"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/agentkey"
	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// maxFanout bounds how many agents one call may name, so that a caller
// cannot make the gateway start an unbounded number of calls at once.
const maxFanout = 100

// RouteByKey is the default routing: the call goes to the agent its key
// header names, or fans out to every agent it names when it names several
// (repeated headers or a comma-separated list; at most 100), without the
// key header. A call that names no agent fails with InvalidArgument, and
// one that names an agent that is not connected with Unavailable, both
// saying so, so that a caller can tell a typo from an outage.
//
// With Options.Cluster, a call for an agent this replica holds no tunnel
// for goes to a replica that holds one (each such agent of a fan-out to
// its own); a call another replica forwarded here goes on only if this
// replica's tunnel for it has just gone (see viaPeers): a call crosses at
// most two hops between replicas.
func (g *Gateway) RouteByKey(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
	keys := g.keys(ctx)
	if len(keys) == 0 {
		return proxy.Route{}, status.Errorf(codes.InvalidArgument,
			"grpctunnel gateway: %s is not served here; name the agent to call in the %q header", errtext.Quote(call.Method()), g.keyHeader)
	}
	if len(keys) > maxFanout {
		return proxy.Route{}, status.Errorf(codes.InvalidArgument, "grpctunnel gateway: a call may name at most %d agents, not %d", maxFanout, len(keys))
	}
	route := proxy.Route{Metadata: g.outgoing(ctx)}
	for _, key := range keys {
		// A withdrawn replica's tunnels are draining: what others hold
		// is better.
		if !g.agents.has(key) || g.withdrawn.Load() {
			if b, ok := g.viaPeers(ctx, key); ok {
				route.Backends = append(route.Backends, b)
				continue
			}
			if len(keys) == 1 && !g.agents.has(key) {
				return proxy.Route{}, status.Errorf(codes.Unavailable, "grpctunnel gateway: no agent is connected with %s %s", g.keyHeader, errtext.Quote(key))
			}
		}
		// When fanning out, a missing agent is one labelled error among
		// the results; the tunnel library reports it as Unavailable.
		route.Backends = append(route.Backends, proxy.Backend{Name: key, Conn: g.Agent(key)})
	}
	return route, nil
}

// agentFailure says which hop refused a call that failed on the way to or
// from an agent, where the tunnel's own status cannot: a message too large
// for the agent, or an answer too large for the gateway. Every other
// status, the service's own above all, passes unchanged.
func (g *Gateway) agentFailure(_ context.Context, b proxy.Backend, err error) error {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.ResourceExhausted {
		return nil
	}
	agent := errtext.Quote(b.Name)
	if b.Name == "" {
		agent = "the agent"
	} else {
		agent = "agent " + agent
	}
	msg := strings.TrimPrefix(st.Message(), "grpctunnel: ")
	switch {
	case strings.HasPrefix(msg, "received request message larger than max"):
		return status.Errorf(codes.ResourceExhausted, "grpctunnel gateway: %s refused the request: %s; the agent's maximum message size (--max-msg-size) must allow it", agent, msg)
	case strings.HasPrefix(msg, "received response message larger than max"):
		return status.Errorf(codes.ResourceExhausted, "grpctunnel gateway: the response from %s is larger than the gateway accepts: %s; raise the gateway's --max-msg-size", agent, msg)
	}
	return nil
}

// keys returns the agent keys a call names, in order, without duplicates.
// It reads only the key header, not a copy of all the call's metadata.
func (g *Gateway) keys(ctx context.Context) []string {
	return keyList(metadata.ValueFromIncomingContext(ctx, g.keyHeader))
}

// keysIn returns the keys named by the values of header in md.
func keysIn(md metadata.MD, header string) []string {
	return keyList(md.Get(header))
}

// keyList splits the values of a key header into keys.
func keyList(values []string) []string {
	if len(values) == 1 && !strings.Contains(values[0], ",") {
		// The common case: one agent, named once.
		if k := strings.TrimSpace(values[0]); k != "" {
			return []string{k}
		}
		return nil
	}
	var keys []string
	for _, v := range values {
		for k := range strings.SplitSeq(v, ",") {
			k = strings.TrimSpace(k)
			if k != "" && !slices.Contains(keys, k) {
				keys = append(keys, k)
			}
		}
	}
	return keys
}

// outgoing returns a copy of the call's incoming metadata without the key
// header and the dropped headers, to send on to the backend.
func (g *Gateway) outgoing(ctx context.Context) metadata.MD {
	md, _ := metadata.FromIncomingContext(ctx) // a copy already
	for _, h := range g.drop {
		delete(md, h)
	}
	return md
}

// refusal is the status of a call or tunnel an authorization function
// refused: its own status, or PermissionDenied.
func refusal(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codes.PermissionDenied, err.Error())
}

// checkTunnel vets the tunnels agents open before the tunnel library
// accepts them: only reverse tunnels, each with exactly one valid key,
// which AuthorizeAgent allows.
func (g *Gateway) checkTunnel(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	switch info.FullMethod {
	case tunnelpb.TunnelService_OpenReverseTunnel_FullMethodName:
	case tunnelpb.TunnelService_OpenTunnel_FullMethodName:
		return status.Error(codes.Unimplemented, "grpctunnel gateway: only agents' reverse tunnels are accepted here")
	default:
		return handler(srv, ss)
	}
	md, _ := metadata.FromIncomingContext(ss.Context())
	keys := md.Get(g.keyHeader)
	if len(keys) != 1 {
		return status.Errorf(codes.InvalidArgument, "grpctunnel gateway: an agent must announce exactly one key in the %q header", g.keyHeader)
	}
	if err := validKey(keys[0]); err != nil {
		return err
	}
	if g.authorize != nil {
		if err := g.authorize(ss.Context(), keys[0]); err != nil {
			return refusal(err)
		}
	}
	return handler(srv, ss)
}

// validKey accepts keys a caller can name in a header and an operator can
// read in a log (see agentkey.Problem, which agents check at start too).
func validKey(key string) error {
	if problem := agentkey.Problem(key); problem != "" {
		return status.Errorf(codes.InvalidArgument, "grpctunnel gateway: agent key %s %s", errtext.Quote(key), problem)
	}
	return nil
}

// keyOf is the key an agent announced on the RPC that opened its tunnel,
// already checked by checkTunnel.
func (g *Gateway) keyOf(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if keys := md.Get(g.keyHeader); len(keys) == 1 {
		return keys[0]
	}
	return ""
}
