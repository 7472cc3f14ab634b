package agent

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
)

// gatewayServiceConfig balances the opening RPCs of the agent's tunnels
// round-robin over every gateway address that is ready: each tunnel opens
// on the next replica, and one that is down is passed over rather than
// waited for. (gRPC's default, pick_first, would put every tunnel on the
// first address that answers.)
const gatewayServiceConfig = `{"loadBalancingConfig": [{"round_robin": {}}]}`

// gatewaysScheme is the scheme of the resolver that gives a gRPC client
// the list of gateway addresses.
const gatewaysScheme = "grpctunnel-gateways"

// DialGateway returns a gRPC client for the gateway at addrs, as
// grpctunnel agent makes it (without connecting yet, as grpc.NewClient):
// one address is a gRPC target resolved as grpc.NewClient resolves it (by
// DNS for host:port), and several are each a host:port dialled as given.
// Either way the tunnels' opening RPCs are balanced round-robin over every
// address that is ready, so that an agent's tunnels land on distinct
// gateway replicas; give the agent len(addrs) as Options.GatewayAddresses
// so that it keeps them there (see Options.GatewayAddresses). With several
// addresses, each is also the name its gateway's TLS certificate is
// checked against, unless the credentials name a server themselves.
//
// The client goes idle after IdleTimeout without an open or opening
// tunnel, so that the agent's backoff alone paces its attempts; opts come
// after that and may change it. Add credentials, and DialOptions.
func DialGateway(addrs []string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if err := checkGatewayAddrs(addrs); err != nil {
		return nil, err
	}
	base := []grpc.DialOption{
		grpc.WithDefaultServiceConfig(gatewayServiceConfig),
		grpc.WithIdleTimeout(IdleTimeout),
	}
	if len(addrs) == 1 {
		return grpc.NewClient(addrs[0], slices.Concat(base, opts)...)
	}
	// The manual resolver keeps the list for the client's life, across
	// idleness too, which rebuilds the resolver.
	r := manual.NewBuilderWithScheme(gatewaysScheme)
	var state resolver.State
	for _, a := range addrs {
		// ServerName makes each address the authority of its own
		// connections, as a single address is: its TLS certificate is
		// checked for its host, and its calls carry it as :authority.
		state.Endpoints = append(state.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{{Addr: a, ServerName: a}}})
	}
	r.InitialState(state)
	return grpc.NewClient(gatewaysScheme+":///gateways", slices.Concat(base, []grpc.DialOption{grpc.WithResolvers(r)}, opts)...)
}

// checkGatewayAddrs refuses a list DialGateway cannot dial as meant.
func checkGatewayAddrs(addrs []string) error {
	if len(addrs) == 0 {
		return errors.New("agent: no gateway address")
	}
	if len(addrs) == 1 {
		return nil
	}
	for i, a := range addrs {
		switch {
		case a == "":
			return fmt.Errorf("agent: gateway address %d of %d is empty", i+1, len(addrs))
		case strings.Contains(a, ":/") || strings.HasPrefix(a, "unix:"):
			return fmt.Errorf("agent: gateway address %s is a gRPC target: a list of addresses takes host:port only", errtext.Quote(a))
		case slices.Index(addrs, a) < i:
			return fmt.Errorf("agent: gateway address %s is listed twice", errtext.Quote(a))
		}
	}
	return nil
}
