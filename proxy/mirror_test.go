package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// tagged is a TestService backend that answers every kind of call with
// its tag in every response payload, header and trailer, so that a test
// can tell whose answer the client got, and records every request payload.
// With fail set it fails each call with that status after reading all of
// its requests.
type tagged struct {
	grpchantesting.UnimplementedTestServiceServer
	tag  string
	fail *status.Status

	mu  sync.Mutex
	got []string
}

func (b *tagged) record(m *grpchantesting.Message) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.got = append(b.got, string(m.GetPayload()))
}

func (b *tagged) requests() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.got)
}

func (b *tagged) md() metadata.MD { return metadata.Pairs("from", b.tag) }

func (b *tagged) reply(payload string) *grpchantesting.Message {
	return &grpchantesting.Message{Payload: []byte(b.tag + ":" + payload)}
}

func (b *tagged) Unary(ctx context.Context, req *grpchantesting.Message) (*grpchantesting.Message, error) {
	b.record(req)
	_ = grpc.SetHeader(ctx, b.md())
	_ = grpc.SetTrailer(ctx, b.md())
	if b.fail != nil {
		return nil, b.fail.Err()
	}
	return b.reply(string(req.GetPayload())), nil
}

func (b *tagged) ClientStream(s grpchantesting.TestService_ClientStreamServer) error {
	_ = s.SetHeader(b.md())
	s.SetTrailer(b.md())
	var all []string
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		b.record(m)
		all = append(all, string(m.GetPayload()))
	}
	if b.fail != nil {
		return b.fail.Err()
	}
	return s.SendAndClose(b.reply(strings.Join(all, ",")))
}

func (b *tagged) ServerStream(req *grpchantesting.Message, s grpchantesting.TestService_ServerStreamServer) error {
	b.record(req)
	_ = s.SendHeader(b.md())
	s.SetTrailer(b.md())
	for i := range 3 {
		if err := s.Send(b.reply(fmt.Sprintf("%s/%d", req.GetPayload(), i))); err != nil {
			return err
		}
	}
	if b.fail != nil {
		return b.fail.Err()
	}
	return nil
}

func (b *tagged) BidiStream(s grpchantesting.TestService_BidiStreamServer) error {
	_ = s.SendHeader(b.md())
	s.SetTrailer(b.md())
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		b.record(m)
		if err := s.Send(b.reply(string(m.GetPayload()))); err != nil {
			return err
		}
	}
	if b.fail != nil {
		return b.fail.Err()
	}
	return nil
}

func serveTagged(t *testing.T, b *tagged, opts ...grpc.ServerOption) *grpc.ClientConn {
	t.Helper()
	return serve(t, func(s *grpc.Server) { grpchantesting.RegisterTestServiceServer(s, b) }, opts...)
}

// outcome is what a client saw of one call.
type outcome struct {
	replies       []string
	header, trail metadata.MD
	err           error
}

var kinds = []string{"unary", "client stream", "server stream", "bidi"}

// callKind makes one call of the kind with the payloads as requests (the
// first one alone for unary and server-streaming calls).
func callKind(ctx context.Context, conn grpc.ClientConnInterface, kind string, payloads ...string) outcome {
	c := grpchantesting.NewTestServiceClient(conn)
	var o outcome
	collect := func(m *grpchantesting.Message) { o.replies = append(o.replies, string(m.GetPayload())) }
	switch kind {
	case "unary":
		m, err := c.Unary(ctx, msg(payloads[0]), grpc.Header(&o.header), grpc.Trailer(&o.trail))
		if err == nil {
			collect(m)
		}
		o.err = err
	case "client stream":
		s, err := c.ClientStream(ctx)
		if err != nil {
			o.err = err
			return o
		}
		for _, p := range payloads {
			if err := s.Send(msg(p)); err != nil {
				break // the status comes from CloseAndRecv
			}
		}
		m, err := s.CloseAndRecv()
		if err == nil {
			collect(m)
		}
		o.err = err
		o.header, _ = s.Header()
		o.trail = s.Trailer()
	case "server stream":
		s, err := c.ServerStream(ctx, msg(payloads[0]))
		if err != nil {
			o.err = err
			return o
		}
		for {
			m, err := s.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					o.err = err
				}
				break
			}
			collect(m)
		}
		o.header, _ = s.Header()
		o.trail = s.Trailer()
	case "bidi":
		s, err := c.BidiStream(ctx)
		if err != nil {
			o.err = err
			return o
		}
		go func() {
			for _, p := range payloads {
				if s.Send(msg(p)) != nil {
					return
				}
			}
			_ = s.CloseSend()
		}()
		for {
			m, err := s.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					o.err = err
				}
				break
			}
			collect(m)
		}
		o.header, _ = s.Header()
		o.trail = s.Trailer()
	}
	return o
}

// sent is what a backend receives of callKind's requests.
func sent(kind string, payloads ...string) []string {
	if kind == "unary" || kind == "server stream" {
		return payloads[:1]
	}
	return payloads
}

// primaryAnswer is what the client of callKind gets from b alone.
func primaryAnswer(b *tagged, kind string, payloads ...string) []string {
	switch kind {
	case "unary":
		return []string{b.tag + ":" + payloads[0]}
	case "client stream":
		return []string{b.tag + ":" + strings.Join(payloads, ",")}
	case "server stream":
		var r []string
		for i := range 3 {
			r = append(r, fmt.Sprintf("%s:%s/%d", b.tag, payloads[0], i))
		}
		return r
	default:
		var r []string
		for _, p := range payloads {
			r = append(r, b.tag+":"+p)
		}
		return r
	}
}

// director routes every call as route, with the incoming metadata.
func director(route proxy.Route) proxy.Director {
	return func(ctx context.Context, _ *proxy.Call) (proxy.Route, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		r := route
		r.Metadata = md.Copy()
		return r, nil
	}
}

// errorLog records what mirrors' OnError handlers are told, by mirror.
type errorLog struct {
	mu   sync.Mutex
	errs map[string][]error
}

// handler returns an OnError for mirror name that records err and
// returns what decide makes of it.
func (l *errorLog) handler(name string, decide func(error) error) func(error) error {
	return func(err error) error {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.errs == nil {
			l.errs = map[string][]error{}
		}
		l.errs[name] = append(l.errs[name], err)
		return decide(err)
	}
}

func (l *errorLog) take(name string) []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	errs := l.errs[name]
	delete(l.errs, name)
	return errs
}

func swallow(error) error       { return nil }
func propagate(err error) error { return err }

func TestMirrorEveryKind(t *testing.T) {
	primary, second, third := &tagged{tag: "primary"}, &tagged{tag: "second"}, &tagged{tag: "third"}
	var log errorLog
	replaced := msg("rewritten for third")
	first, err := proto.Marshal(replaced)
	if err != nil {
		t.Fatal(err)
	}
	route := proxy.Route{
		Backends: []proxy.Backend{{Name: "primary", Conn: serveTagged(t, primary)}},
		Mirrors: []proxy.Mirror{
			{Backend: proxy.Backend{Name: "second", Conn: serveTagged(t, second)}, OnError: log.handler("second", propagate)},
			{Backend: proxy.Backend{Name: "third", Conn: serveTagged(t, third)}, FirstMessage: first, OnError: log.handler("third", propagate)},
		},
	}
	// A long wait: the mirrors are healthy and must never be given up on.
	front := serve(t, nil, proxy.ServerOptions(director(route), proxy.WithMirrorWait(time.Minute))...)

	payloads := []string{"a", "b", "c"}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			primary.got, second.got, third.got = nil, nil, nil
			got := callKind(context.Background(), front, kind, payloads...)
			if got.err != nil {
				t.Fatalf("call failed: %v", got.err)
			}
			if want := primaryAnswer(primary, kind, payloads...); !slices.Equal(got.replies, want) {
				t.Errorf("replies %q, want the primary's %q", got.replies, want)
			}
			if h := got.header.Get("from"); !slices.Equal(h, []string{"primary"}) {
				t.Errorf("header from %q, want the primary's only", h)
			}
			if tr := got.trail.Get("from"); !slices.Equal(tr, []string{"primary"}) {
				t.Errorf("trailer from %q, want the primary's only", tr)
			}
			// The status waited for the mirrors, so they have it all.
			want := sent(kind, payloads...)
			if r := primary.requests(); !slices.Equal(r, want) {
				t.Errorf("primary got %q, want %q", r, want)
			}
			if r := second.requests(); !slices.Equal(r, want) {
				t.Errorf("second mirror got %q, want %q", r, want)
			}
			wantThird := append([]string{"rewritten for third"}, want[1:]...)
			if r := third.requests(); !slices.Equal(r, wantThird) {
				t.Errorf("third mirror got %q, want %q", r, wantThird)
			}
			for _, name := range []string{"second", "third"} {
				if errs := log.take(name); len(errs) > 0 {
					t.Errorf("mirror %s reported %v", name, errs)
				}
			}
		})
	}

	t.Run("primary fails", func(t *testing.T) {
		primary.fail = status.New(codes.FailedPrecondition, "primary says no")
		defer func() { primary.fail = nil }()
		for _, kind := range kinds {
			got := callKind(context.Background(), front, kind, payloads...)
			if status.Code(got.err) != codes.FailedPrecondition || status.Convert(got.err).Message() != "primary says no" {
				t.Errorf("%s: status %v, want the primary's", kind, got.err)
			}
			if tr := got.trail.Get("from"); !slices.Equal(tr, []string{"primary"}) {
				t.Errorf("%s: trailer from %q, want the primary's", kind, tr)
			}
		}
	})
}

// stalled serves every method with a handler that never reads and blocks
// until the test ends, on a server whose flow-control windows do not grow,
// so that what it has not read holds its sender up. entered counts the
// calls it got, returned those its handler returned from.
type stalled struct {
	entered  chan struct{}
	release  chan struct{}
	returned atomic.Int32
}

func serveStalled(t *testing.T) (*stalled, *grpc.ClientConn) {
	t.Helper()
	s := &stalled{entered: make(chan struct{}, 64), release: make(chan struct{})}
	conn := serve(t, nil,
		grpc.InitialWindowSize(64<<10), grpc.InitialConnWindowSize(64<<10),
		grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
			s.entered <- struct{}{}
			<-s.release
			s.returned.Add(1)
			return nil
		}))
	// Registered after serve's, so it runs first: the handlers return
	// before the server stops.
	t.Cleanup(func() { close(s.release) })
	return s, conn
}

func TestMirrorStalledMirror(t *testing.T) {
	primary := &tagged{tag: "primary"}
	primaryConn := serveTagged(t, primary)
	stuck, stuckConn := serveStalled(t)
	var log errorLog

	baseline := serve(t, nil, proxy.ServerOptions(director(proxy.Route{
		Backends: []proxy.Backend{{Name: "primary", Conn: primaryConn}},
	}))...)
	mirrored := func(opts ...proxy.Option) *grpc.ClientConn {
		return serve(t, nil, proxy.ServerOptions(director(proxy.Route{
			Backends: []proxy.Backend{{Name: "primary", Conn: primaryConn}},
			Mirrors: []proxy.Mirror{{
				Backend: proxy.Backend{Name: "stuck", Conn: stuckConn},
				OnError: log.handler("stuck", swallow),
			}},
		}), opts...)...)
	}

	check := func(t *testing.T, conn *grpc.ClientConn, kind string, payloads ...string) {
		t.Helper()
		got := callKind(context.Background(), conn, kind, payloads...)
		if got.err != nil {
			t.Fatalf("call failed: %v", got.err)
		}
		if want := primaryAnswer(primary, kind, payloads...); !slices.Equal(got.replies, want) {
			t.Fatalf("replies %q, want %q", got.replies, want)
		}
	}
	lagged := func(t *testing.T, late bool) *proxy.MirrorLagError {
		t.Helper()
		errs := log.take("stuck")
		if len(errs) != 1 {
			t.Fatalf("the stalled mirror's handler was told %v, want one error", errs)
		}
		var lag *proxy.MirrorLagError
		if !errors.As(errs[0], &lag) || lag.Late != late || lag.Mirror != "stuck" {
			t.Fatalf("the stalled mirror's handler was told %v (%#v), want it fell behind (late %v)", errs[0], lag, late)
		}
		return lag
	}

	// With small requests the stalled mirror's transport takes them all:
	// only the wait after the primary's answer can end it, and with no
	// wait the call ends as soon as the primary's does.
	t.Run("no wait", func(t *testing.T) {
		front := mirrored(proxy.WithMirrorWait(0))
		for _, kind := range kinds {
			t.Run(kind, func(t *testing.T) {
				check(t, baseline, kind, "a", "b")
				check(t, front, kind, "a", "b")
				await(t, stuck.entered, "the stalled mirror's call")
				if n := stuck.returned.Load(); n != 0 {
					t.Fatalf("%d stalled handlers returned; the calls must end while it is stuck", n)
				}
				lag := lagged(t, true)
				if s := status.Convert(lag); s.Code() != codes.DeadlineExceeded || !strings.Contains(s.Message(), "fell behind") {
					t.Errorf("status %v", s)
				}
			})
		}
	})

	// With more requests than the mirror takes and a wait far longer than
	// the test, the buffer alone gives up on the mirror while the primary
	// takes requests: nothing waits on a timer.
	t.Run("buffer", func(t *testing.T) {
		front := mirrored(proxy.WithMirrorBuffer(64<<10), proxy.WithMirrorWait(time.Hour))
		big := strings.Repeat("x", 32<<10)
		payloads := slices.Repeat([]string{big}, 32) // 1 MiB: far more than the windows and the buffer
		for _, kind := range []string{"client stream", "bidi"} {
			t.Run(kind, func(t *testing.T) {
				check(t, baseline, kind, payloads...)
				check(t, front, kind, payloads...)
				await(t, stuck.entered, "the stalled mirror's call")
				if n := stuck.returned.Load(); n != 0 {
					t.Fatalf("%d stalled handlers returned; the calls must end while it is stuck", n)
				}
				lag := lagged(t, false)
				if lag.Messages < 2 || lag.Bytes < 64<<10 || status.Code(lag) != codes.ResourceExhausted {
					t.Errorf("fell behind by %d messages, %d bytes (%v); want more than the buffer", lag.Messages, lag.Bytes, lag)
				}
			})
		}
	})
}

func TestMirrorFailing(t *testing.T) {
	primary := &tagged{tag: "primary"}
	failing := &tagged{tag: "failing", fail: status.New(codes.DataLoss, "mirror lost it")}
	primaryConn, failingConn := serveTagged(t, primary), serveTagged(t, failing)
	var log errorLog
	front := func(decide func(error) error, finalize func(context.Context) error) *grpc.ClientConn {
		return serve(t, nil, proxy.ServerOptions(director(proxy.Route{
			Backends: []proxy.Backend{{Name: "primary", Conn: primaryConn}},
			Mirrors: []proxy.Mirror{{
				Backend: proxy.Backend{Name: "failing", Conn: failingConn},
				OnError: log.handler("failing", decide),
			}},
			Finalize: finalize,
		}), proxy.WithMirrorWait(time.Minute))...)
	}
	told := func(t *testing.T) {
		t.Helper()
		errs := log.take("failing")
		if len(errs) != 1 || status.Code(errs[0]) != codes.DataLoss {
			t.Fatalf("the failing mirror's handler was told %v, want its DataLoss", errs)
		}
	}

	t.Run("swallowed", func(t *testing.T) {
		conn := front(swallow, nil)
		for _, kind := range kinds {
			got := callKind(context.Background(), conn, kind, "a", "b")
			if got.err != nil {
				t.Fatalf("%s: call failed: %v", kind, got.err)
			}
			if want := primaryAnswer(primary, kind, "a", "b"); !slices.Equal(got.replies, want) {
				t.Errorf("%s: replies %q, want %q", kind, got.replies, want)
			}
			told(t)
		}
	})

	// A mirror's failure that its handler returns fails the call at its
	// end: the client has the primary's headers and messages, then the
	// mirror's status.
	t.Run("returned", func(t *testing.T) {
		conn := front(propagate, nil)
		for _, kind := range []string{"server stream", "bidi"} {
			got := callKind(context.Background(), conn, kind, "a", "b")
			if status.Code(got.err) != codes.DataLoss {
				t.Fatalf("%s: status %v, want the mirror's DataLoss", kind, got.err)
			}
			if want := primaryAnswer(primary, kind, "a", "b"); !slices.Equal(got.replies, want) {
				t.Errorf("%s: replies %q, want all of the primary's %q before the failure", kind, got.replies, want)
			}
			if h := got.header.Get("from"); !slices.Equal(h, []string{"primary"}) {
				t.Errorf("%s: header from %q, want the primary's", kind, h)
			}
			told(t)
		}
		for _, kind := range []string{"unary", "client stream"} {
			if got := callKind(context.Background(), conn, kind, "a", "b"); status.Code(got.err) != codes.DataLoss {
				t.Fatalf("%s: status %v, want the mirror's DataLoss", kind, got.err)
			}
			told(t)
		}
	})

	t.Run("finalizer", func(t *testing.T) {
		var finalized atomic.Int32
		var sawMirror atomic.Bool
		finalize := func(ctx context.Context) error {
			finalized.Add(1)
			// It runs after the mirrors' calls ended.
			sawMirror.Store(len(failing.requests()) > 0)
			return status.Error(codes.Aborted, "votes did not agree")
		}
		failing.got = nil
		got := callKind(context.Background(), front(swallow, finalize), "unary", "a")
		if status.Code(got.err) != codes.Aborted || status.Convert(got.err).Message() != "votes did not agree" {
			t.Fatalf("status %v, want the finalizer's", got.err)
		}
		if !sawMirror.Load() {
			t.Error("the finalizer ran before the mirror had the request")
		}
		told(t)
		// An earlier failure wins, but the finalizer still runs.
		got = callKind(context.Background(), front(propagate, finalize), "unary", "a")
		if status.Code(got.err) != codes.DataLoss {
			t.Fatalf("status %v, want the mirror's, which came first", got.err)
		}
		told(t)
		if n := finalized.Load(); n != 2 {
			t.Errorf("finalizer ran %d times, want 2", n)
		}
	})
}

func TestMirrorRouteChecks(t *testing.T) {
	primary := serveTagged(t, &tagged{tag: "primary"})
	var log errorLog
	// Fanning out and mirroring at once is a director's mistake, however
	// the route asks for the fan-out and whatever makes it mirrored; so
	// is a mirrored route without a primary, as any route without a
	// backend. A mirror without a connection is that mirror's failure
	// only.
	mirror := []proxy.Mirror{{Backend: proxy.Backend{Name: "mirror", Conn: primary}, OnError: log.handler("mirror", propagate)}}
	finalize := func(context.Context) error { return nil }
	for _, c := range []struct {
		name  string
		route proxy.Route
		code  codes.Code
		msg   string // a prefix
	}{
		{"two primaries", proxy.Route{Backends: []proxy.Backend{{Conn: primary}, {Conn: primary}}, Mirrors: mirror},
			codes.Internal, "proxy: a route cannot both fan out and mirror"},
		{"fan out", proxy.Route{Backends: []proxy.Backend{{Conn: primary}}, FanOut: true, Mirrors: mirror},
			codes.Internal, "proxy: a route cannot both fan out and mirror"},
		{"fan out with a finalizer", proxy.Route{Backends: []proxy.Backend{{Conn: primary}}, FanOut: true, Finalize: finalize},
			codes.Internal, "proxy: a route cannot both fan out and mirror"},
		{"no primary", proxy.Route{Mirrors: mirror},
			codes.Unavailable, "proxy: no backend for /grpchantesting.TestService/"},
	} {
		front := serve(t, nil, proxy.ServerOptions(director(c.route))...)
		for _, kind := range kinds {
			got := callKind(context.Background(), front, kind, "a")
			if s := status.Convert(got.err); s.Code() != c.code || !strings.HasPrefix(s.Message(), c.msg) {
				t.Errorf("%s, %s: status %v, want %v %q", c.name, kind, got.err, c.code, c.msg)
			}
			if len(got.replies) > 0 {
				t.Errorf("%s, %s: got replies %q", c.name, kind, got.replies)
			}
		}
		// The call never started, so the mirror did not fail.
		if errs := log.take("mirror"); len(errs) > 0 {
			t.Errorf("%s: the mirror reported %v", c.name, errs)
		}
	}
	noConn := serve(t, nil, proxy.ServerOptions(director(proxy.Route{
		Backends: []proxy.Backend{{Conn: primary}},
		Mirrors:  []proxy.Mirror{{Backend: proxy.Backend{Name: "gone"}, OnError: log.handler("gone", swallow)}},
	}))...)
	if got := callKind(context.Background(), noConn, "unary", "a"); got.err != nil {
		t.Errorf("mirror without a connection: %v", got.err)
	}
	if errs := log.take("gone"); len(errs) != 1 || status.Code(errs[0]) != codes.Unavailable {
		t.Errorf("mirror without a connection reported %v", errs)
	}
}

// A request the proxy cannot read (too large for its server) ends the
// mirrored call with that error, rather than leaving the primary waiting
// for requests.
func TestMirrorRequestTooLarge(t *testing.T) {
	primary, mirrored := &tagged{tag: "primary"}, &tagged{tag: "mirror"}
	front := serve(t, nil, append(proxy.ServerOptions(director(proxy.Route{
		Backends: []proxy.Backend{{Conn: serveTagged(t, primary)}},
		Mirrors:  []proxy.Mirror{{Backend: proxy.Backend{Conn: serveTagged(t, mirrored)}}},
	})), grpc.MaxRecvMsgSize(100))...)
	// The bound only turns a hang into a failure.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got := callKind(ctx, front, "client stream", "small", strings.Repeat("x", 1000))
	if status.Code(got.err) != codes.ResourceExhausted {
		t.Errorf("call ended with %v; want ResourceExhausted", got.err)
	}
}

// whoLog makes server options that record the "who" metadata of every call
// a server gets, before its handler runs.
type whoLog struct {
	mu  sync.Mutex
	got [][]string
}

func (l *whoLog) options() []grpc.ServerOption {
	record := func(ctx context.Context) {
		md, _ := metadata.FromIncomingContext(ctx)
		l.mu.Lock()
		defer l.mu.Unlock()
		l.got = append(l.got, md.Get("who"))
	}
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			record(ctx)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			record(ss.Context())
			return h(srv, ss)
		}),
	}
}

func (l *whoLog) take() [][]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	got := l.got
	l.got = nil
	return got
}

// A mirror with its own Metadata gets that instead of the route's, even
// when empty; the primary and a mirror without one get the route's.
func TestMirrorMetadata(t *testing.T) {
	var log errorLog
	names := []string{"primary", "own", "inherits", "empty"}
	whos := map[string]*whoLog{}
	conns := map[string]*grpc.ClientConn{}
	for _, name := range names {
		whos[name] = new(whoLog)
		conns[name] = serveTagged(t, &tagged{tag: name}, whos[name].options()...)
	}
	mirror := func(name string, md metadata.MD) proxy.Mirror {
		return proxy.Mirror{Backend: proxy.Backend{Name: name, Conn: conns[name]}, Metadata: md, OnError: log.handler(name, propagate)}
	}
	route := proxy.Route{
		Backends: []proxy.Backend{{Name: "primary", Conn: conns["primary"]}},
		Metadata: metadata.Pairs("who", "route"),
		Mirrors: []proxy.Mirror{
			mirror("own", metadata.Pairs("who", "own mirror")),
			mirror("inherits", nil),
			mirror("empty", metadata.MD{}),
		},
	}
	direct := func(context.Context, *proxy.Call) (proxy.Route, error) { return route, nil }
	// The status waits for the mirrors, so every call has reached them
	// when it returns.
	front := serve(t, nil, proxy.ServerOptions(direct, proxy.WithMirrorWait(time.Minute))...)
	want := map[string][][]string{
		"primary":  {{"route"}},
		"own":      {{"own mirror"}},
		"inherits": {{"route"}},
		"empty":    {nil},
	}
	for _, kind := range kinds {
		if got := callKind(context.Background(), front, kind, "a", "b"); got.err != nil {
			t.Fatalf("%s: call failed: %v", kind, got.err)
		}
		for _, name := range names {
			if got := whos[name].take(); !slices.EqualFunc(got, want[name], slices.Equal) {
				t.Errorf("%s: %s got who %q, want %q", kind, name, got, want[name])
			}
			if errs := log.take(name); len(errs) > 0 {
				t.Errorf("%s: mirror %s reported %v", kind, name, errs)
			}
		}
	}
}

// A mirror without an OnError is best effort: its failure, whatever it
// is, leaves the call to the primary.
func TestMirrorNilOnErrorSwallows(t *testing.T) {
	primary := &tagged{tag: "primary"}
	failing := &tagged{tag: "failing", fail: status.New(codes.DataLoss, "mirror lost it")}
	front := serve(t, nil, proxy.ServerOptions(director(proxy.Route{
		Backends: []proxy.Backend{{Name: "primary", Conn: serveTagged(t, primary)}},
		Mirrors: []proxy.Mirror{
			{Backend: proxy.Backend{Name: "failing", Conn: serveTagged(t, failing)}},
			{Backend: proxy.Backend{Name: "gone"}},
		},
	}), proxy.WithMirrorWait(time.Minute))...)
	for _, kind := range kinds {
		failing.got = nil
		got := callKind(context.Background(), front, kind, "a", "b")
		if got.err != nil {
			t.Fatalf("%s: call failed: %v", kind, got.err)
		}
		if want := primaryAnswer(primary, kind, "a", "b"); !slices.Equal(got.replies, want) {
			t.Errorf("%s: replies %q, want %q", kind, got.replies, want)
		}
		// The call waited for the mirror, which did fail.
		if r, want := failing.requests(), sent(kind, "a", "b"); !slices.Equal(r, want) {
			t.Errorf("%s: failing mirror got %q, want %q", kind, r, want)
		}
	}
}

// WithBackendErrors rewrites the primary's failure, which the client
// sees, but not a mirror's, which goes to its OnError as the mirror gave
// it; what OnError returns reaches the client unchanged.
func TestMirrorBackendErrors(t *testing.T) {
	primary := &tagged{tag: "primary"}
	failing := &tagged{tag: "failing", fail: status.New(codes.DataLoss, "mirror lost it")}
	var log errorLog
	var mu sync.Mutex
	var rewrote []string
	rewrite := func(_ context.Context, b proxy.Backend, err error) error {
		mu.Lock()
		defer mu.Unlock()
		rewrote = append(rewrote, b.Name)
		return status.Errorf(codes.Unavailable, "backend %s failed", b.Name)
	}
	rewritten := func() []string {
		mu.Lock()
		defer mu.Unlock()
		r := rewrote
		rewrote = nil
		return r
	}
	front := serve(t, nil, proxy.ServerOptions(director(proxy.Route{
		Backends: []proxy.Backend{{Name: "primary", Conn: serveTagged(t, primary)}},
		Mirrors: []proxy.Mirror{
			{Backend: proxy.Backend{Name: "failing", Conn: serveTagged(t, failing)}, OnError: log.handler("failing", propagate)},
			{Backend: proxy.Backend{Name: "gone"}, OnError: log.handler("gone", swallow)},
		},
	}), proxy.WithMirrorWait(time.Minute), proxy.WithBackendErrors(rewrite))...)
	told := func(t *testing.T) {
		t.Helper()
		if errs := log.take("failing"); len(errs) != 1 || status.Code(errs[0]) != codes.DataLoss || status.Convert(errs[0]).Message() != "mirror lost it" {
			t.Errorf("the failing mirror's OnError was told %v, want its own DataLoss", errs)
		}
		if errs := log.take("gone"); len(errs) != 1 || !strings.Contains(status.Convert(errs[0]).Message(), "no connection for mirror") {
			t.Errorf("the unconnected mirror's OnError was told %v, want the proxy's own error", errs)
		}
	}

	got := callKind(context.Background(), front, "unary", "a")
	if s := status.Convert(got.err); s.Code() != codes.DataLoss || s.Message() != "mirror lost it" {
		t.Errorf("status %v, want the mirror's DataLoss as its OnError returned it", got.err)
	}
	told(t)
	if r := rewritten(); len(r) > 0 {
		t.Errorf("WithBackendErrors rewrote the failures of %q; want none", r)
	}

	primary.fail = status.New(codes.FailedPrecondition, "primary says no")
	defer func() { primary.fail = nil }()
	got = callKind(context.Background(), front, "unary", "a")
	if s := status.Convert(got.err); s.Code() != codes.Unavailable || s.Message() != "backend primary failed" {
		t.Errorf("status %v, want the primary's failure rewritten", got.err)
	}
	told(t)
	if r := rewritten(); !slices.Equal(r, []string{"primary"}) {
		t.Errorf("WithBackendErrors rewrote the failures of %q; want the primary's only", r)
	}
}

// hanging is a mirror backend that takes one request, then waits for its
// call to be cancelled: got and cancelled are closed as it does each.
type hanging struct {
	got, cancelled chan struct{}
}

func serveHanging(t *testing.T) (*hanging, *grpc.ClientConn) {
	t.Helper()
	h := &hanging{got: make(chan struct{}), cancelled: make(chan struct{})}
	conn := serve(t, nil, grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		if err := ss.RecvMsg(new(grpchantesting.Message)); err != nil {
			return err
		}
		close(h.got)
		<-ss.Context().Done()
		close(h.cancelled)
		return ss.Context().Err()
	}))
	return h, conn
}

// A client that cancels mid-call cancels the primary's and every mirror's
// calls, without the wait; the call ends with Canceled, and each mirror
// still running is told through its OnError, whose answer changes nothing.
func TestMirrorClientCancels(t *testing.T) {
	primary := &tagged{tag: "primary"}
	var log errorLog
	names := []string{"first", "second"}
	route := proxy.Route{Backends: []proxy.Backend{{Name: "primary", Conn: serveTagged(t, primary)}}}
	mirrors := map[string]*hanging{}
	for _, name := range names {
		h, conn := serveHanging(t)
		mirrors[name] = h
		route.Mirrors = append(route.Mirrors, proxy.Mirror{
			Backend: proxy.Backend{Name: name, Conn: conn},
			OnError: log.handler(name, propagate),
		})
	}
	// What the proxy's handler returned, as opposed to what the client's
	// own cancellation makes it see.
	handled := make(chan error, 1)
	front := serve(t, nil, append(proxy.ServerOptions(director(route), proxy.WithMirrorWait(time.Hour)),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			err := h(srv, ss)
			handled <- err
			return err
		}))...)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := grpchantesting.NewTestServiceClient(front).BidiStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(msg("a")); err != nil {
		t.Fatal(err)
	}
	if m, err := s.Recv(); err != nil || string(m.GetPayload()) != "primary:a" {
		t.Fatalf("first reply %v, %v; want the primary's", m, err)
	}
	for _, name := range names {
		await(t, mirrors[name].got, "mirror "+name+"'s request")
	}
	cancel()
	if _, err := s.Recv(); status.Code(err) != codes.Canceled {
		t.Errorf("client got %v, want Canceled", err)
	}
	// The wait is an hour: only cancelling the mirrors ends the call.
	select {
	case err := <-handled:
		if status.Code(err) != codes.Canceled {
			t.Errorf("the proxy ended the call with %v, want Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for the proxy to end the call")
	}
	for _, name := range names {
		await(t, mirrors[name].cancelled, "mirror "+name+"'s call to be cancelled")
		if errs := log.take(name); len(errs) != 1 || status.Code(errs[0]) != codes.Canceled {
			t.Errorf("mirror %s's OnError was told %v, want one Canceled", name, errs)
		}
	}
}
