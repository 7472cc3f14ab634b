// Package demo is a small DeviceService (see internal/demopb) for the
// grpctunnel command's demo and end-to-end tests: something real to put
// behind an agent, with the health and reflection services that clients
// such as grpcurl expect.
package demo

import (
	"context"
	"slices"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
)

// logLines is the device's log, oldest first.
var logLines = []string{
	"boot: firmware 2.0",
	"net: connected via NAT gateway",
	"sensor: temperature 21.5C",
	"sensor: temperature 21.7C",
	"sensor: temperature 21.6C",
}

// LogLines returns the log that Tail streams, oldest first, so that callers
// can check what came back.
func LogLines() []string { return slices.Clone(logLines) }

// DeviceService answers DeviceService calls as a device named by its
// constructor would.
type DeviceService struct {
	demopb.UnimplementedDeviceServiceServer
	name  string
	calls atomic.Int64
}

// NewDeviceService returns a DeviceService that names itself name in its
// responses, so that a caller can see which device answered.
func NewDeviceService(name string) *DeviceService {
	return &DeviceService{name: name}
}

// GetStatus reports the device's name, state and how many calls it has
// served, this one included.
func (d *DeviceService) GetStatus(context.Context, *demopb.GetStatusRequest) (*demopb.GetStatusResponse, error) {
	n := d.calls.Add(1)
	return &demopb.GetStatusResponse{ServedBy: d.name, State: "online", CallsServed: n}, nil
}

// Tail streams the last req.Lines lines of the device's log, or all of it
// when req.Lines is zero or less, one message per line.
func (d *DeviceService) Tail(req *demopb.TailRequest, stream grpc.ServerStreamingServer[demopb.TailResponse]) error {
	d.calls.Add(1)
	lines := logLines
	if n := int(req.GetLines()); n > 0 && n < len(lines) {
		lines = lines[len(lines)-n:]
	}
	for _, l := range lines {
		if err := stream.Send(&demopb.TailResponse{Line: l}); err != nil {
			return err
		}
	}
	return nil
}

// Notify accepts any notification.
func (d *DeviceService) Notify(context.Context, *demopb.NotifyRequest) (*demopb.NotifyResponse, error) {
	d.calls.Add(1)
	return &demopb.NotifyResponse{ServedBy: d.name, Accepted: true}, nil
}

// Register adds svc, gRPC health and server reflection to s, and returns the
// health server, which reports s and DeviceService as serving; call its
// Shutdown when s starts to drain.
func Register(s reflection.GRPCServer, svc *DeviceService) *health.Server {
	demopb.RegisterDeviceServiceServer(s, svc)
	h := health.NewServer()
	h.SetServingStatus(demopb.DeviceService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s, h)
	reflection.Register(s)
	return h
}
