package tunnel

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// statsRecorder is a stats.Handler that keeps every event, per call.
type statsRecorder struct {
	mu    sync.Mutex
	calls []*recordedCall
	conns []stats.ConnStats
}

type recordedCall struct {
	method string
	events []stats.RPCStats
}

// Each recorder keys its calls in the context by itself, so that several
// recorders on one end do not see each other's.
type recordedCallKey struct{ r *statsRecorder }

func (r *statsRecorder) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	c := &recordedCall{method: info.FullMethodName}
	r.mu.Lock()
	r.calls = append(r.calls, c)
	r.mu.Unlock()
	return context.WithValue(ctx, recordedCallKey{r}, c)
}

func (r *statsRecorder) HandleRPC(ctx context.Context, s stats.RPCStats) {
	c := ctx.Value(recordedCallKey{r}).(*recordedCall)
	r.mu.Lock()
	c.events = append(c.events, s)
	r.mu.Unlock()
}

func (r *statsRecorder) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (r *statsRecorder) HandleConn(_ context.Context, s stats.ConnStats) {
	r.mu.Lock()
	r.conns = append(r.conns, s)
	r.mu.Unlock()
}

// ended waits for the n-th call to method to have ended and returns its
// events.
func (r *statsRecorder) ended(t *testing.T, method string, n int) []stats.RPCStats {
	t.Helper()
	var events []stats.RPCStats
	waitFor(t, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		seen := 0
		for _, c := range r.calls {
			if c.method != method {
				continue
			}
			if seen++; seen == n && len(c.events) > 0 {
				if _, ok := c.events[len(c.events)-1].(*stats.End); ok {
					events = slices.Clone(c.events)
					return true
				}
			}
		}
		return false
	})
	return events
}

func (r *statsRecorder) connEvents() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	for _, c := range r.conns {
		switch c := c.(type) {
		case *stats.ConnBegin:
			names = append(names, "ConnBegin"+side(c.Client))
		case *stats.ConnEnd:
			names = append(names, "ConnEnd"+side(c.Client))
		}
	}
	return names
}

func side(client bool) string {
	if client {
		return "(client)"
	}
	return "(server)"
}

func eventName(s stats.RPCStats) string {
	return strings.TrimPrefix(fmt.Sprintf("%T", s), "*stats.")
}

// shape is a call's events as three sequences: those that bracket it and
// each direction's. Events of different directions come from different
// goroutines (the caller's or handler's, and the tunnel's reader), so only
// their order within a direction is fixed, as in grpc-go.
type shape struct {
	first, last string
	out, in     []string
}

func shapeOf(t *testing.T, events []stats.RPCStats, client bool) shape {
	t.Helper()
	var s shape
	for i, e := range events {
		if e.IsClient() != client {
			t.Errorf("event %d (%s) has IsClient %v, want %v", i, eventName(e), e.IsClient(), client)
		}
		name := eventName(e)
		switch {
		case i == 0:
			s.first = name
		case i == len(events)-1:
			s.last = name
		case strings.HasPrefix(name, "Out"):
			s.out = append(s.out, name)
		case strings.HasPrefix(name, "In"):
			s.in = append(s.in, name)
		default:
			s.in = append(s.in, name) // Begin on the handling end follows InHeader
		}
	}
	return s
}

func checkShape(t *testing.T, who string, got, want shape) {
	t.Helper()
	if got.first != want.first || got.last != want.last || !slices.Equal(got.out, want.out) || !slices.Equal(got.in, want.in) {
		t.Errorf("%s events:\n got %+v\nwant %+v", who, got, want)
	}
}

func find[T stats.RPCStats](events []stats.RPCStats) []T {
	var found []T
	for _, e := range events {
		if e, ok := e.(T); ok {
			found = append(found, e)
		}
	}
	return found
}

// TestStatsHandlerEvents checks that both ends of forward and reverse
// tunnels report what grpc-go reports for a call: the same events, in the
// same order, with metadata, sizes and status.
func TestStatsHandlerEvents(t *testing.T) {
	for _, tr := range transports[:2] {
		t.Run(tr.name, func(t *testing.T) {
			client, server := &statsRecorder{}, &statsRecorder{}
			p := &probe{unary: func(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
				if string(in.GetValue()) == "fail" {
					return nil, status.Error(codes.NotFound, "no such thing")
				}
				_ = grpc.SetHeader(ctx, metadata.Pairs("resp-header", "h"))
				_ = grpc.SetTrailer(ctx, metadata.Pairs("resp-trailer", "t"))
				return in, nil
			}}
			cc := tr.dial(t, testServices(p), []TunnelOption{WithStatsHandler(server), WithClientStatsHandler(client)})
			ctx := metadata.AppendToOutgoingContext(context.Background(), "req-header", "r")

			t.Run("unary", func(t *testing.T) {
				req := bytesValue([]byte("hello"))
				if err := cc.Invoke(ctx, probeUnary, req, new(wrapperspb.BytesValue)); err != nil {
					t.Fatal(err)
				}
				size := proto.Size(req)

				ce := client.ended(t, probeUnary, 1)
				// The trailers arrive with the response, on the reader,
				// while the caller reads the response: either may be
				// reported first, as in grpc-go.
				in := shapeOf(t, ce, true)
				in.in = slices.DeleteFunc(in.in, func(s string) bool { return s == "InTrailer" })
				checkShape(t, "client", in, shape{"Begin", "End", []string{"OutHeader", "OutPayload"}, []string{"InHeader", "InPayload"}})
				if n := len(find[*stats.InTrailer](ce)); n != 1 {
					t.Errorf("client saw %d InTrailer events, want 1", n)
				}
				oh := find[*stats.OutHeader](ce)[0]
				if oh.FullMethod != probeUnary || oh.Header.Get("req-header")[0] != "r" {
					t.Errorf("client OutHeader = %+v", oh)
				}
				if op := find[*stats.OutPayload](ce)[0]; op.Length != size || op.WireLength != size || op.CompressedLength != size || op.Payload != req {
					t.Errorf("client OutPayload = %+v, want sizes %d", op, size)
				}
				if ih := find[*stats.InHeader](ce)[0]; !slices.Equal(ih.Header.Get("resp-header"), []string{"h"}) || ih.WireLength == 0 {
					t.Errorf("client InHeader = %+v", ih)
				}
				if ip := find[*stats.InPayload](ce)[0]; ip.Length != size || ip.WireLength != size {
					t.Errorf("client InPayload = %+v, want sizes %d", ip, size)
				}
				if it := find[*stats.InTrailer](ce)[0]; !slices.Equal(it.Trailer.Get("resp-trailer"), []string{"t"}) {
					t.Errorf("client InTrailer = %+v", it)
				}
				end := find[*stats.End](ce)[0]
				if end.Error != nil || !slices.Equal(end.Trailer.Get("resp-trailer"), []string{"t"}) || end.EndTime.Before(end.BeginTime) {
					t.Errorf("client End = %+v", end)
				}

				se := server.ended(t, probeUnary, 1)
				checkShape(t, "server", shapeOf(t, se, false), shape{"InHeader", "End", []string{"OutHeader", "OutPayload", "OutTrailer"}, []string{"Begin", "InPayload"}})
				ih := find[*stats.InHeader](se)[0]
				if ih.FullMethod != probeUnary || !slices.Equal(ih.Header.Get("req-header"), []string{"r"}) || ih.WireLength == 0 || ih.RemoteAddr == nil {
					t.Errorf("server InHeader = %+v", ih)
				}
				if b := find[*stats.Begin](se)[0]; b.IsClientStream || b.IsServerStream {
					t.Errorf("server Begin = %+v, want a unary call", b)
				}
				if ip := find[*stats.InPayload](se)[0]; ip.Length != size {
					t.Errorf("server InPayload = %+v, want length %d", ip, size)
				}
				if oh := find[*stats.OutHeader](se)[0]; !slices.Equal(oh.Header.Get("resp-header"), []string{"h"}) {
					t.Errorf("server OutHeader = %+v", oh)
				}
				if ot := find[*stats.OutTrailer](se)[0]; !slices.Equal(ot.Trailer.Get("resp-trailer"), []string{"t"}) {
					t.Errorf("server OutTrailer = %+v", ot)
				}
				if end := find[*stats.End](se)[0]; end.Error != nil {
					t.Errorf("server End = %+v", end)
				}
			})

			t.Run("error", func(t *testing.T) {
				err := cc.Invoke(ctx, probeUnary, bytesValue([]byte("fail")), new(wrapperspb.BytesValue))
				if status.Code(err) != codes.NotFound {
					t.Fatalf("call failed with %v, want NotFound", err)
				}
				ce := client.ended(t, probeUnary, 2)
				if end := find[*stats.End](ce)[0]; status.Code(end.Error) != codes.NotFound {
					t.Errorf("client End.Error = %v", end.Error)
				}
				if n := len(find[*stats.InHeader](ce)); n != 0 {
					t.Errorf("client saw %d InHeader events for a trailers-only response", n)
				}
				se := server.ended(t, probeUnary, 2)
				// A trailers-only response: no headers, no message.
				checkShape(t, "server", shapeOf(t, se, false), shape{"InHeader", "End", []string{"OutTrailer"}, []string{"Begin", "InPayload"}})
				if end := find[*stats.End](se)[0]; status.Code(end.Error) != codes.NotFound {
					t.Errorf("server End.Error = %v", end.Error)
				}
			})

			t.Run("stream", func(t *testing.T) {
				s, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
				if err != nil {
					t.Fatal(err)
				}
				for _, v := range []string{"one", "two"} {
					if err := s.SendMsg(bytesValue([]byte(v))); err != nil {
						t.Fatal(err)
					}
					if err := s.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
						t.Fatal(err)
					}
				}
				if err := s.CloseSend(); err != nil {
					t.Fatal(err)
				}
				if err := s.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
					t.Fatalf("end of stream: %v", err)
				}
				ce := client.ended(t, probeStream, 1)
				checkShape(t, "client", shapeOf(t, ce, true), shape{"Begin", "End",
					[]string{"OutHeader", "OutPayload", "OutPayload"},
					[]string{"InHeader", "InPayload", "InPayload", "InTrailer"}})
				if b := find[*stats.Begin](ce)[0]; !b.IsClientStream || !b.IsServerStream {
					t.Errorf("client Begin = %+v, want both sides streaming", b)
				}
				se := server.ended(t, probeStream, 1)
				checkShape(t, "server", shapeOf(t, se, false), shape{"InHeader", "End",
					[]string{"OutHeader", "OutPayload", "OutPayload", "OutTrailer"},
					[]string{"Begin", "InPayload", "InPayload"}})
			})

			t.Run("cancelled", func(t *testing.T) {
				sctx, cancel := context.WithCancel(ctx)
				s, err := cc.NewStream(sctx, probeStreamDesc, probeStream)
				if err != nil {
					t.Fatal(err)
				}
				if err := s.SendMsg(bytesValue([]byte("one"))); err != nil {
					t.Fatal(err)
				}
				cancel()
				// The caller never reads the result: the call is over for
				// stats handlers all the same.
				ce := client.ended(t, probeStream, 2)
				if end := find[*stats.End](ce)[0]; status.Code(end.Error) != codes.Canceled {
					t.Errorf("client End.Error = %v, want Canceled", end.Error)
				}
				se := server.ended(t, probeStream, 2)
				if end := find[*stats.End](se)[0]; status.Code(end.Error) != codes.Canceled {
					t.Errorf("server End.Error = %v, want Canceled", end.Error)
				}
			})

			if got := client.connEvents(); !slices.Equal(got, []string{"ConnBegin(client)"}) {
				t.Errorf("client connection events %v", got)
			}
			if got := server.connEvents(); !slices.Equal(got, []string{"ConnBegin(server)"}) {
				t.Errorf("server connection events %v", got)
			}
		})
	}
}

// TestStatsHandlerConnEnd checks that a tunnel's end is reported on both
// ends, and that several handlers each see every event.
func TestStatsHandlerConnEnd(t *testing.T) {
	a, b, server := &statsRecorder{}, &statsRecorder{}, &statsRecorder{}
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithStatsHandler(server)}}, testServices(nil))
	ch, err := NewChannel(ts.stub, WithClientStatsHandler(a), WithClientStatsHandler(nil), WithClientStatsHandler(b)).Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Invoke(context.Background(), probeUnary, bytesValue(nil), new(wrapperspb.BytesValue)); status.Code(err) != codes.Unimplemented {
		t.Fatalf("call to an unregistered service: %v", err)
	}
	ch.Close()
	for _, r := range []*statsRecorder{a, b} {
		if got := r.connEvents(); !slices.Equal(got, []string{"ConnBegin(client)", "ConnEnd(client)"}) {
			t.Errorf("client connection events %v", got)
		}
		if end := find[*stats.End](r.ended(t, probeUnary, 1))[0]; status.Code(end.Error) != codes.Unimplemented {
			t.Errorf("End.Error = %v", end.Error)
		}
	}
	waitFor(t, func() bool { return len(server.connEvents()) == 2 })
	if got := server.connEvents(); !slices.Equal(got, []string{"ConnBegin(server)", "ConnEnd(server)"}) {
		t.Errorf("server connection events %v", got)
	}
}

// TestOpenTelemetryThroughTunnels proves tracing end to end with
// OpenTelemetry's own gRPC instrumentation: a tunneled call yields a client
// span under the caller's span and a server span under the client span,
// linked through the call's metadata, named after the method and carrying
// its status.
func TestOpenTelemetryThroughTunnels(t *testing.T) {
	for _, tr := range transports[:2] {
		t.Run(tr.name, func(t *testing.T) {
			spans := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
			defer func() { _ = tp.Shutdown(context.Background()) }()
			prop := propagation.TraceContext{}
			opts := []TunnelOption{
				WithClientStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(prop))),
				WithStatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(prop))),
			}
			p := &probe{unary: func(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
				if string(in.GetValue()) == "fail" {
					return nil, status.Error(codes.Internal, "broken")
				}
				return in, nil
			}}
			cc := tr.dial(t, testServices(p), opts)

			ctx, parent := tp.Tracer("test").Start(context.Background(), "parent")
			if err := cc.Invoke(ctx, probeUnary, bytesValue([]byte("ok")), new(wrapperspb.BytesValue)); err != nil {
				t.Fatal(err)
			}
			if err := cc.Invoke(ctx, probeUnary, bytesValue([]byte("fail")), new(wrapperspb.BytesValue)); status.Code(err) != codes.Internal {
				t.Fatalf("failing call: %v", err)
			}
			parent.End()
			// Server spans end when their handlers have returned, which may
			// be after the caller saw the response.
			waitFor(t, func() bool { return len(spans.Ended()) == 5 })

			var clients, servers []sdktrace.ReadOnlySpan
			for _, s := range spans.Ended() {
				switch s.SpanKind() {
				case trace.SpanKindClient:
					clients = append(clients, s)
				case trace.SpanKindServer:
					servers = append(servers, s)
				}
			}
			if len(clients) != 2 || len(servers) != 2 {
				t.Fatalf("%d client and %d server spans, want 2 of each", len(clients), len(servers))
			}
			wantName := strings.TrimPrefix(probeUnary, "/")
			for i, want := range []string{"OK", "INTERNAL"} {
				c := clients[i]
				var s sdktrace.ReadOnlySpan
				for _, cand := range servers {
					if cand.Parent().SpanID() == c.SpanContext().SpanID() {
						s = cand
					}
				}
				if s == nil {
					t.Fatalf("no server span is a child of client span %v", c.SpanContext().SpanID())
				}
				if c.Name() != wantName || s.Name() != wantName {
					t.Errorf("span names %q and %q, want %q", c.Name(), s.Name(), wantName)
				}
				if c.Parent().SpanID() != parent.SpanContext().SpanID() || c.SpanContext().TraceID() != parent.SpanContext().TraceID() {
					t.Errorf("client span's parent is %v, want the caller's span %v", c.Parent().SpanID(), parent.SpanContext().SpanID())
				}
				if !s.Parent().IsRemote() || s.SpanContext().TraceID() != c.SpanContext().TraceID() {
					t.Errorf("server span is not a remote child in the caller's trace: %+v", s.Parent())
				}
				for _, span := range []sdktrace.ReadOnlySpan{c, s} {
					if got := statusAttribute(span); got != want {
						t.Errorf("%v span has status code %q, want %q", span.SpanKind(), got, want)
					}
					wantCode := otelcodes.Unset
					if want != "OK" {
						wantCode = otelcodes.Error
					}
					if span.Status().Code != wantCode {
						t.Errorf("%v span status %+v, want %v", span.SpanKind(), span.Status(), wantCode)
					}
				}
			}
		})
	}
}

func statusAttribute(s sdktrace.ReadOnlySpan) string {
	for _, kv := range s.Attributes() {
		if kv.Key == "rpc.response.status_code" {
			return kv.Value.AsString()
		}
	}
	return ""
}
