package gateway

import (
	"errors"
	"io"
	"strings"

	"github.com/fullstorydev/grpchan"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// localServices are the services the gateway answers itself, for calls
// that name no agent. They run on the stream of the call as a *grpc.Server
// would run them: the gateway's server has to route every call through its
// unknown-service handler (so that a call naming an agent reaches the
// agent's health service, not the gateway's), which leaves dispatching
// its own services to it.
type localServices struct {
	grpchan.HandlerMap
}

// lookup returns the handler of method, or nil if no local service has it.
func (l localServices) lookup(method string) func(grpc.ServerStream) error {
	service, name, ok := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	if !ok {
		return nil
	}
	desc, impl := l.QueryService(service)
	if desc == nil {
		return nil
	}
	for i := range desc.Methods {
		if m := &desc.Methods[i]; m.MethodName == name {
			return func(ss grpc.ServerStream) error { return unary(m, impl, ss) }
		}
	}
	for i := range desc.Streams {
		if s := &desc.Streams[i]; s.StreamName == name {
			return func(ss grpc.ServerStream) error { return s.Handler(impl, ss) }
		}
	}
	return nil
}

// unary runs a unary method on a stream: one request in, one response out.
// The server's codec decodes the request into the method's own type.
func unary(m *grpc.MethodDesc, impl any, ss grpc.ServerStream) error {
	resp, err := m.Handler(impl, ss.Context(), func(req any) error {
		err := ss.RecvMsg(req)
		if errors.Is(err, io.EOF) {
			return status.Error(codes.Internal, "grpctunnel gateway: the call ended before its request message")
		}
		return err
	}, nil)
	if err != nil {
		return err
	}
	return ss.SendMsg(resp)
}
