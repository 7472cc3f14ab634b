package tunnel

import (
	"strings"

	"github.com/fullstorydev/grpchan"
	"google.golang.org/grpc"
)

// services are the handlers a tunnel server dispatches to: what was
// registered through grpc.ServiceRegistrar.
type services struct {
	handlers grpchan.HandlerMap
}

func newServices() *services {
	return &services{handlers: grpchan.HandlerMap{}}
}

// RegisterService implements grpc.ServiceRegistrar.
func (s *services) RegisterService(desc *grpc.ServiceDesc, impl any) {
	s.handlers.RegisterService(desc, impl)
}

// GetServiceInfo reports the registered services as grpc.Server does, for
// server reflection.
func (s *services) GetServiceInfo() map[string]grpc.ServiceInfo {
	return s.handlers.GetServiceInfo()
}

func (s *services) empty() bool { return len(s.handlers) == 0 }

// callHandler runs one tunneled call to completion and returns its status.
// A unary-response handler also returns its response, unsent, so that the
// response and the status can leave together.
type callHandler func(*serverStream) (resp any, err error)

// methodKind says which sides of a call stream.
type methodKind struct{ clientStreams, serverStreams bool }

// lookup resolves a full method name to its handler, or a status error to
// close the stream with. The handler runs through o's server interceptors.
//
// Its refusals have grpc.Server's code (Unimplemented) and words, with the
// package's prefix: clients and tools tell them by their code.
func (s *services) lookup(fullMethod string, o *options) (callHandler, methodKind, error) {
	unknown := o.unknownHandler
	name := strings.TrimPrefix(fullMethod, "/")
	slash := strings.LastIndex(name, "/")
	if slash <= 0 || slash == len(name)-1 {
		return nil, methodKind{}, errMalformedMethod(fullMethod)
	}
	service, method := name[:slash], name[slash+1:]
	desc, impl := s.handlers.QueryService(service)
	if desc == nil {
		if unknown != nil {
			return func(st *serverStream) (any, error) {
				return nil, st.t.opts.ic.interceptStream(nil, unknown, st, true, true)
			}, methodKind{clientStreams: true, serverStreams: true}, nil
		}
		return nil, methodKind{}, errUnknownService(service)
	}
	for i := range desc.Methods {
		if desc.Methods[i].MethodName == method {
			h := desc.Methods[i].Handler
			return func(st *serverStream) (any, error) {
				return h(impl, st.ctx, st.recvUnaryRequest, st.t.opts.ic.unaryServer)
			}, methodKind{}, nil
		}
	}
	for i := range desc.Streams {
		if desc.Streams[i].StreamName == method {
			sd := desc.Streams[i]
			return func(st *serverStream) (any, error) {
				return nil, st.t.opts.ic.interceptStream(impl, sd.Handler, st, sd.ClientStreams, sd.ServerStreams)
			}, methodKind{clientStreams: sd.ClientStreams, serverStreams: sd.ServerStreams}, nil
		}
	}
	return nil, methodKind{}, errUnknownMethod(method, service)
}
