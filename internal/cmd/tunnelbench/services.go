package main

import (
	"context"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The bench service is described by hand, with well-known message types, so
// that the command needs no generated code: what it measures is the
// transport, and any message type exercises that equally.
const (
	serviceName    = "grpctunnel.bench.Bench"
	echoMethod     = "/" + serviceName + "/Echo"
	downloadMethod = "/" + serviceName + "/Download"
	idleMethod     = "/" + serviceName + "/Idle"
)

// benchService is the service's handler type, as generated code would
// declare it.
type benchService interface {
	// Echo returns its request.
	Echo(context.Context, *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error)
	// Download sends messages of the requested size until the caller
	// cancels. It has no count of its own because the caller times the
	// stream by the clock: it cannot know in advance how many messages fit
	// in the measurement at a rate it has yet to measure.
	Download(*wrapperspb.UInt64Value, grpc.ServerStream) error
	// Idle sends response headers at once, so that the caller knows the
	// stream is open end to end, and then waits for the caller to
	// half-close or cancel without sending anything.
	Idle(grpc.ServerStream) error
}

// downloadDesc and idleDesc describe the streaming methods for callers.
var (
	downloadDesc = &grpc.StreamDesc{StreamName: "Download", ServerStreams: true}
	idleDesc     = &grpc.StreamDesc{StreamName: "Idle", ServerStreams: true, ClientStreams: true}
)

// benchDesc is what generated code would call the service descriptor. It is
// never modified.
var benchDesc = grpc.ServiceDesc{
	ServiceName: serviceName,
	HandlerType: (*benchService)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Echo",
		Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			if interceptor == nil {
				return srv.(benchService).Echo(ctx, in)
			}
			info := &grpc.UnaryServerInfo{Server: srv, FullMethod: echoMethod}
			return interceptor(ctx, in, info, func(ctx context.Context, req any) (any, error) {
				return srv.(benchService).Echo(ctx, req.(*wrapperspb.BytesValue))
			})
		},
	}},
	Streams: []grpc.StreamDesc{
		{
			StreamName:    downloadDesc.StreamName,
			ServerStreams: true,
			Handler: func(srv any, stream grpc.ServerStream) error {
				req := new(wrapperspb.UInt64Value)
				if err := stream.RecvMsg(req); err != nil {
					return err
				}
				return srv.(benchService).Download(req, stream)
			},
		},
		{
			StreamName:    idleDesc.StreamName,
			ServerStreams: true,
			ClientStreams: true,
			Handler: func(srv any, stream grpc.ServerStream) error {
				return srv.(benchService).Idle(stream)
			},
		},
	},
}

// registerBench registers the bench service on r: a *grpc.Server, a
// TunnelServiceHandler or a ReverseTunnelServer alike.
func registerBench(r grpc.ServiceRegistrar) {
	r.RegisterService(&benchDesc, benchServer{})
}

// benchServer implements benchService. It keeps no state, so one value can
// serve every transport at once.
type benchServer struct{}

func (benchServer) Echo(_ context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	return in, nil
}

func (benchServer) Download(req *wrapperspb.UInt64Value, stream grpc.ServerStream) error {
	// One message is sent over and over: the bench measures the transport,
	// not the cost of building payloads.
	msg := wrapperspb.Bytes(make([]byte, req.GetValue()))
	ctx := stream.Context()
	for ctx.Err() == nil {
		if err := stream.SendMsg(msg); err != nil {
			return err
		}
	}
	return ctx.Err()
}

func (benchServer) Idle(stream grpc.ServerStream) error {
	if err := stream.SendHeader(nil); err != nil {
		return err
	}
	for {
		if err := stream.RecvMsg(new(emptypb.Empty)); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// echo makes one Echo call with req.
func echo(ctx context.Context, cc grpc.ClientConnInterface, req *wrapperspb.BytesValue) error {
	return cc.Invoke(ctx, echoMethod, req, new(wrapperspb.BytesValue))
}

// openDownload starts a Download of messages of size bytes. It ends when
// ctx is cancelled.
func openDownload(ctx context.Context, cc grpc.ClientConnInterface, size int) (grpc.ClientStream, error) {
	// Messages above gRPC's default 4 MiB limit are allowed on purpose:
	// -size decides, not a default meant to stop accidents.
	cs, err := cc.NewStream(ctx, downloadDesc, downloadMethod, grpc.MaxCallRecvMsgSize(size+1024))
	if err != nil {
		return nil, err
	}
	if err := cs.SendMsg(wrapperspb.UInt64(uint64(size))); err != nil {
		return nil, err
	}
	if err := cs.CloseSend(); err != nil {
		return nil, err
	}
	return cs, nil
}

// openIdle opens an Idle stream and returns once its response headers have
// arrived, when both ends hold the stream open. It stays open until ctx is
// cancelled.
func openIdle(ctx context.Context, cc grpc.ClientConnInterface) (grpc.ClientStream, error) {
	cs, err := cc.NewStream(ctx, idleDesc, idleMethod)
	if err != nil {
		return nil, err
	}
	if _, err := cs.Header(); err != nil {
		return nil, err
	}
	return cs, nil
}
