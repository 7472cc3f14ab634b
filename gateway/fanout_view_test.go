package gateway_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/proxy/proxypb"
)

const labelFile = "grpctunnel/proxy/v1/label.proto"

// With several agents named, reflection describes the fan-out view of one
// agent's services: every method returns a stream, every message has the
// label field, whose file the gateway serves itself.
func TestFanOutReflectionView(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	backend := startBackend(t)
	startAgent(t, g, gw, backend, "a", 1)
	startAgent(t, g, gw, backend, "b", 1)
	ctx := context.Background()

	stream, err := reflectionpb.NewServerReflectionClient(keyed(gw, "a,b")).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(req *reflectionpb.ServerReflectionRequest) []*descriptorpb.FileDescriptorProto {
		t.Helper()
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		var files []*descriptorpb.FileDescriptorProto
		for _, b := range resp.GetFileDescriptorResponse().GetFileDescriptorProto() {
			fd := new(descriptorpb.FileDescriptorProto)
			if err := proto.Unmarshal(b, fd); err != nil {
				t.Fatal(err)
			}
			files = append(files, fd)
		}
		return files
	}

	files := ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "grpchantesting.TestService"}})
	i := slices.IndexFunc(files, func(fd *descriptorpb.FileDescriptorProto) bool { return len(fd.GetService()) > 0 })
	if i < 0 {
		t.Fatalf("no file with the service among %d", len(files))
	}
	fd := files[i]
	for _, m := range fd.GetService()[0].GetMethod() {
		if !m.GetServerStreaming() {
			t.Errorf("%s does not return a stream in the fan-out view", m.GetName())
		}
	}
	if !slices.Contains(fd.GetDependency(), labelFile) {
		t.Errorf("the view does not import %s: %v", labelFile, fd.GetDependency())
	}
	for _, m := range fd.GetMessageType() {
		j := slices.IndexFunc(m.GetField(), func(f *descriptorpb.FieldDescriptorProto) bool { return f.GetName() == "grpctunnel_label" })
		if j < 0 {
			t.Errorf("message %s has no label field", m.GetName())
			continue
		}
		if f := m.GetField()[j]; f.GetNumber() != int32(proxy.DefaultLabelField) || f.GetTypeName() != ".grpctunnel.proxy.v1.Label" {
			t.Errorf("message %s's label field: %v", m.GetName(), f)
		}
	}

	files = ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileByFilename{FileByFilename: labelFile}})
	if len(files) != 1 || files[0].GetName() != labelFile || files[0].GetMessageType()[0].GetName() != "Label" {
		t.Errorf("the label's file, from the gateway: %v", files)
	}
	files = ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "google.rpc.Status"}})
	if len(files) != 1 || files[0].GetName() != (&proxypb.Label{}).GetStatus().ProtoReflect().Descriptor().ParentFile().Path() {
		t.Errorf("the file of the label's status, from the gateway: %v", files)
	}
	_ = stream.CloseSend()

	// The older reflection version works the same: its messages are v1's
	// on the wire, and its package is deprecated, so v1's types ask it.
	alpha, err := keyed(gw, "a,b").NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
	if err != nil {
		t.Fatal(err)
	}
	if err := alpha.SendMsg(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	listed := new(reflectionpb.ServerReflectionResponse)
	if err := alpha.RecvMsg(listed); err != nil || !slices.ContainsFunc(listed.GetListServicesResponse().GetService(), func(s *reflectionpb.ServiceResponse) bool {
		return s.GetName() == "grpchantesting.TestService"
	}) {
		t.Errorf("v1alpha list through two agents: %v %v", listed, err)
	}
	_ = alpha.CloseSend()

	// When none of the agents named is connected, reflection says so.
	none, err := reflectionpb.NewServerReflectionClient(keyed(gw, "x,y")).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = none.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
	if _, err := none.Recv(); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "none of the agents named is connected") {
		t.Errorf("reflection through two missing agents: %v", err)
	}
}

// Health is never fanned out: with several agents named, the gateway
// answers it.
func TestFanOutHealthIsTheGateways(t *testing.T) {
	_, gw := startGateway(t, gateway.Options{})
	resp, err := healthpb.NewHealthClient(keyed(gw, "a,b")).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health with two agents named, none connected: %v %v", resp, err)
	}
}
