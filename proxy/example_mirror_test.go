package proxy_test

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// replica is a health service standing in for a Gitaly node: it records
// which "repository" each check names, and fails every check if down.
type replica struct {
	healthpb.UnimplementedHealthServer
	name string
	down bool
	seen chan string
}

func (r *replica) Check(_ context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	r.seen <- r.name + " got " + req.GetService()
	if r.down {
		return nil, status.Error(codes.Unavailable, r.name+" is down")
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func serveReplica(r *replica) (*grpc.ClientConn, func()) {
	r.seen = make(chan string, 1)
	return listen(func(s *grpc.Server) { healthpb.RegisterHealthServer(s, r) })
}

// Mirroring as Gitaly's praefect does it, for a praefect-style director
// moving to this package. Gitaly's pieces map one to one:
//
//   - StreamDirector returning *StreamParameters: a Director returning a
//     Route;
//   - the primary Destination: Route.Backends' one backend, with
//     Route.Metadata in place of its Ctx's metadata;
//   - each secondary Destination: a Mirror, Msg becoming FirstMessage,
//     ErrHandler becoming OnError and Ctx's metadata Mirror.Metadata;
//   - the request finalizer: Route.Finalize;
//   - TransparentHandler and the proxy codec: ServerOptions (or Handler
//     with Codec).
//
// One difference: a secondary that falls behind the primary is cancelled
// and reported to its OnError, where Gitaly would wait for it; a
// replicating deployment waits longer with WithMirrorWait.
func Example_mirror() {
	primary, stopPrimary := serveReplica(&replica{name: "gitaly-1"})
	defer stopPrimary()
	second := &replica{name: "gitaly-2"}
	secondConn, stopSecond := serveReplica(second)
	defer stopSecond()
	third := &replica{name: "gitaly-3", down: true}
	thirdConn, stopThird := serveReplica(third)
	defer stopThird()

	director := func(ctx context.Context, call *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		// Like Gitaly's, the director reads the first request to find
		// the repository (here, the health check's service name).
		first, err := call.Peek()
		if err != nil {
			return proxy.Route{}, err
		}
		req := new(healthpb.HealthCheckRequest)
		if err := proto.Unmarshal(first, req); err != nil {
			return proxy.Route{}, status.Error(codes.InvalidArgument, "not a request this proxy routes")
		}
		// The secondaries keep the repository under another path: their
		// first message is rewritten (Gitaly's Destination.Msg).
		rewritten, err := proto.Marshal(&healthpb.HealthCheckRequest{Service: "@replica/" + req.GetService()})
		if err != nil {
			return proxy.Route{}, err
		}
		return proxy.Route{
			Backends: []proxy.Backend{{Name: "gitaly-1", Conn: primary}},
			Metadata: md.Copy(),
			Mirrors: []proxy.Mirror{{
				Backend:      proxy.Backend{Name: "gitaly-2", Conn: secondConn},
				FirstMessage: rewritten,
				// This replica must have the write: its failure fails
				// the call.
				OnError: func(err error) error { return err },
			}, {
				Backend:      proxy.Backend{Name: "gitaly-3", Conn: thirdConn},
				FirstMessage: rewritten,
				// This one is repaired later by replication: its
				// failure is noted and swallowed.
				OnError: func(err error) error {
					fmt.Println("gitaly-3 failed, swallowed:", status.Code(err))
					return nil
				},
			}},
			Finalize: func(context.Context) error {
				fmt.Println("finalizer: primary and secondaries are done")
				return nil // an error here would become the call's status
			},
		}, nil
	}
	// A replicating deployment gives its secondaries time to finish after
	// the primary; the default gives up on them after a second.
	front, stopFront := listen(nil, proxy.ServerOptions(director, proxy.WithMirrorWait(time.Minute))...)
	defer stopFront()

	resp, err := healthpb.NewHealthClient(front).Check(context.Background(), &healthpb.HealthCheckRequest{Service: "group/project.git"})
	fmt.Println("client:", resp.GetStatus(), err)
	fmt.Println(<-second.seen)
	fmt.Println(<-third.seen)
	// Output:
	// gitaly-3 failed, swallowed: Unavailable
	// finalizer: primary and secondaries are done
	// client: SERVING <nil>
	// gitaly-2 got @replica/group/project.git
	// gitaly-3 got @replica/group/project.git
}
