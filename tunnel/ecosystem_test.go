package tunnel

import (
	"context"
	"io"
	"slices"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"
)

// The standard health and reflection services register on tunnel servers
// as on a *grpc.Server, and their standard clients work through tunnels.

// ecosystem is a channel to a tunnel server with health, reflection and
// grpchan's test service registered, and the health server to change.
type ecosystem struct {
	cc     grpc.ClientConnInterface
	health *health.Server
}

func ecosystemSetups(t *testing.T) map[string]ecosystem {
	reg := func(hs *health.Server) registrar {
		return func(r grpc.ServiceRegistrar) {
			healthpb.RegisterHealthServer(r, hs)
			grpchantesting.RegisterTestServiceServer(r, &grpchantesting.TestServer{})
			// reflection.Register needs RegisterService and GetServiceInfo,
			// which both tunnel servers have.
			reflection.Register(r.(reflection.GRPCServer))
		}
	}
	fwd := health.NewServer()
	ts := startServer(t, TunnelServiceHandlerOptions{}, reg(fwd))
	rev := health.NewServer()
	rts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	reverse(t, rts.handler, rts.stub, 1, reg(rev))
	return map[string]ecosystem{
		"forward": {forward(t, ts.stub), fwd},
		"reverse": {rts.handler.AsChannel(), rev},
	}
}

func TestHealthThroughTunnels(t *testing.T) {
	for name, e := range ecosystemSetups(t) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			client := healthpb.NewHealthClient(e.cc)
			e.health.SetServingStatus("svc", healthpb.HealthCheckResponse_SERVING)

			for _, svc := range []string{"", "svc"} {
				resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
				if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
					t.Fatalf("Check(%q) = %v, %v; want SERVING", svc, resp.GetStatus(), err)
				}
			}

			watch, err := client.Watch(ctx, &healthpb.HealthCheckRequest{Service: "svc"})
			if err != nil {
				t.Fatal(err)
			}
			// The first update is the status now; once it arrived the
			// watch is in place, and a change reaches it.
			if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("first watch update %v, %v; want SERVING", resp.GetStatus(), err)
			}
			e.health.SetServingStatus("svc", healthpb.HealthCheckResponse_NOT_SERVING)
			if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Fatalf("watch update after the change %v, %v; want NOT_SERVING", resp.GetStatus(), err)
			}
			resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "svc"})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Fatalf("Check after the change = %v, %v; want NOT_SERVING", resp.GetStatus(), err)
			}
		})
	}
}

func TestReflectionThroughTunnels(t *testing.T) {
	for name, e := range ecosystemSetups(t) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stream, err := reflectionpb.NewServerReflectionClient(e.cc).ServerReflectionInfo(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ask := func(req *reflectionpb.ServerReflectionRequest) *reflectionpb.ServerReflectionResponse {
				t.Helper()
				if err := stream.Send(req); err != nil {
					t.Fatal(err)
				}
				resp, err := stream.Recv()
				if err != nil {
					t.Fatal(err)
				}
				if e := resp.GetErrorResponse(); e != nil {
					t.Fatalf("reflection error %d: %s", e.GetErrorCode(), e.GetErrorMessage())
				}
				return resp
			}

			resp := ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
			var services []string
			for _, s := range resp.GetListServicesResponse().GetService() {
				services = append(services, s.GetName())
			}
			slices.Sort(services)
			want := []string{
				"grpc.health.v1.Health",
				"grpc.reflection.v1.ServerReflection",
				"grpc.reflection.v1alpha.ServerReflection",
				"grpchantesting.TestService",
			}
			if !slices.Equal(services, want) {
				t.Errorf("services %v, want %v", services, want)
			}

			for symbol, file := range map[string]string{
				"grpc.health.v1.Health":      "grpc/health/v1/health.proto",
				"grpchantesting.TestService": "test.proto",
			} {
				resp := ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: symbol}})
				protos := resp.GetFileDescriptorResponse().GetFileDescriptorProto()
				if len(protos) == 0 {
					t.Fatalf("no file descriptor for %s", symbol)
				}
				fd := new(descriptorpb.FileDescriptorProto)
				if err := proto.Unmarshal(protos[0], fd); err != nil {
					t.Fatal(err)
				}
				var names []string
				for _, s := range fd.GetService() {
					names = append(names, fd.GetPackage()+"."+s.GetName())
				}
				if fd.GetName() != file || !slices.Contains(names, symbol) {
					t.Errorf("file for %s: %s with services %v; want %s", symbol, fd.GetName(), names, file)
				}
			}

			if err := stream.CloseSend(); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); err != io.EOF {
				t.Fatalf("end of reflection stream: %v", err)
			}
		})
	}
}
