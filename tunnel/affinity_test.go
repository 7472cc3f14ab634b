package tunnel

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// affKeyHeader is the opening-RPC header the tests' AffinityKey reads.
const affKeyHeader = "aff-key"

// affKey derives a tunnel's affinity key from the metadata of the RPC that
// opened it; a tunnel opened without the header has key nil.
func affKey(ch TunnelChannel) any {
	md, _ := metadata.FromIncomingContext(ch.Context())
	if v := md.Get(affKeyHeader); len(v) > 0 {
		return v[0]
	}
	return nil
}

// affRecorder counts, per tunnel, the calls to AffinityKey,
// OnReverseTunnelOpen and OnReverseTunnelClose.
type affRecorder struct {
	key func(TunnelChannel) any

	mu     sync.Mutex
	keyed  map[TunnelChannel]int
	opened map[TunnelChannel]int
	closed map[TunnelChannel]int
	// keyedBeforeOpen is false if some tunnel was reported open before its
	// key was computed exactly once.
	keyedBeforeOpen bool
}

func newAffRecorder(key func(TunnelChannel) any) *affRecorder {
	return &affRecorder{
		key:             key,
		keyed:           map[TunnelChannel]int{},
		opened:          map[TunnelChannel]int{},
		closed:          map[TunnelChannel]int{},
		keyedBeforeOpen: true,
	}
}

func (r *affRecorder) options() TunnelServiceHandlerOptions {
	return TunnelServiceHandlerOptions{
		AffinityKey: func(ch TunnelChannel) any {
			r.mu.Lock()
			r.keyed[ch]++
			r.mu.Unlock()
			return r.key(ch)
		},
		OnReverseTunnelOpen: func(ch TunnelChannel) {
			r.mu.Lock()
			defer r.mu.Unlock()
			if r.keyed[ch] != 1 {
				r.keyedBeforeOpen = false
			}
			r.opened[ch]++
		},
		OnReverseTunnelClose: func(ch TunnelChannel) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.closed[ch]++
		},
	}
}

func (r *affRecorder) counts(ch TunnelChannel) (keyed, opened, closed int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.keyed[ch], r.opened[ch], r.closed[ch]
}

func (r *affRecorder) totals() (keyed, opened, closed int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range r.keyed {
		keyed += n
	}
	for _, n := range r.opened {
		opened += n
	}
	for _, n := range r.closed {
		closed += n
	}
	return keyed, opened, closed
}

// affIDProbe answers every call with id: the unary method with one message,
// the streaming method with one message and then, once the client has
// half-closed, the end of the call (so that a caller can hold it open).
func affIDProbe(id string) *probe {
	return &probe{
		unary: func(context.Context, *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
			return bytesValue([]byte(id)), nil
		},
		stream: func(s grpc.ServerStream) error {
			if err := s.SendMsg(bytesValue([]byte(id))); err != nil {
				return err
			}
			for s.RecvMsg(bytesValue(nil)) == nil {
			}
			return nil
		},
	}
}

// affCall makes one unary probe call and returns the id that answered.
func affCall(ctx context.Context, cc grpc.ClientConnInterface, opts ...grpc.CallOption) (string, error) {
	out := new(wrapperspb.BytesValue)
	err := cc.Invoke(ctx, probeUnary, bytesValue(nil), out, opts...)
	return string(out.GetValue()), err
}

type affServeResult struct {
	started bool
	err     error
}

// affServer is one ReverseTunnelServer whose probe answers with its id, and
// the tunnels it opened.
type affServer struct {
	id   string
	rs   *ReverseTunnelServer
	tuns []TunnelChannel     // the handler's view of its tunnels
	res  chan affServeResult // one result per Serve
}

// affOpen starts a ReverseTunnelServer with id's probe that opens n tunnels
// with the given affinity key header (none if key is empty), and waits until
// h holds all of them. Its tunnels are the ones that appear in
// AllReverseTunnels meanwhile, so opens must not overlap. The server is
// stopped at cleanup.
func affOpen(t testing.TB, h *TunnelServiceHandler, stub tunnelpb.TunnelServiceClient, id, key string, n int) *affServer {
	t.Helper()
	s := &affServer{id: id, rs: NewReverseTunnelServer(stub), res: make(chan affServeResult, n)}
	s.rs.RegisterService(&probeDesc, affIDProbe(id))
	ctx := context.Background()
	if key != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, affKeyHeader, key)
	}
	before := h.AllReverseTunnels()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			started, err := s.rs.Serve(ctx)
			s.res <- affServeResult{started, err}
		}()
	}
	t.Cleanup(func() {
		s.rs.Stop()
		wg.Wait()
	})
	waitFor(t, func() bool { return len(h.AllReverseTunnels()) >= len(before)+n })
	for _, tun := range h.AllReverseTunnels() {
		if !slices.Contains(before, tun) {
			s.tuns = append(s.tuns, tun)
		}
	}
	if len(s.tuns) != n {
		t.Fatalf("server %s: %d new tunnels; want %d", id, len(s.tuns), n)
	}
	// Each of them must reach this server.
	for _, tun := range s.tuns {
		got, err := affCall(context.Background(), tun)
		if err != nil || got != id {
			t.Fatalf("call on a tunnel of server %s: got %q, %v", id, got, err)
		}
	}
	return s
}

// affSpread makes n unary calls through cc and returns who answered, in
// order.
func affSpread(t testing.TB, cc grpc.ClientConnInterface, n int) []string {
	t.Helper()
	out := make([]string, n)
	for i := range out {
		id, err := affCall(context.Background(), cc)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		out[i] = id
	}
	return out
}

// affWantRoundRobin checks that calls went to exactly ids, each in turn: the
// first len(ids) calls reach them all, and every later call repeats the one
// len(ids) before it.
func affWantRoundRobin(t testing.TB, calls, ids []string) {
	t.Helper()
	count := map[string]int{}
	for i, id := range calls {
		if !slices.Contains(ids, id) {
			t.Fatalf("call %d reached %q, not one of %v (calls: %v)", i, id, ids, calls)
		}
		if i >= len(ids) && calls[i-len(ids)] != id {
			t.Fatalf("calls are not round-robin over %v: %v", ids, calls)
		}
		count[id]++
	}
	for _, id := range ids {
		if want := len(calls) / len(ids); count[id] != want {
			t.Fatalf("server %s got %d of %d calls; want %d (calls: %v)", id, count[id], len(calls), want, calls)
		}
	}
}

func affWantTunnels(t testing.TB, h *TunnelServiceHandler, want ...[]TunnelChannel) {
	t.Helper()
	var all []TunnelChannel
	for _, w := range want {
		all = append(all, w...)
	}
	got := h.AllReverseTunnels()
	if len(got) != len(all) {
		t.Fatalf("AllReverseTunnels has %d tunnels; want %d", len(got), len(all))
	}
	for _, tun := range all {
		if !slices.Contains(got, tun) {
			t.Fatalf("AllReverseTunnels lacks an open tunnel")
		}
	}
}

func TestAffinityKeys(t *testing.T) {
	rec := newAffRecorder(affKey)
	ts := startServer(t, rec.options(), nil)
	h := ts.handler

	if h.AsChannel().Ready() || h.KeyAsChannel("a").Ready() {
		t.Fatal("Ready with no tunnel open")
	}
	a0 := affOpen(t, h, ts.stub, "a0", "a", 1)
	b0 := affOpen(t, h, ts.stub, "b0", "b", 1)
	a1 := affOpen(t, h, ts.stub, "a1", "a", 1)
	b1 := affOpen(t, h, ts.stub, "b1", "b", 1)
	a2 := affOpen(t, h, ts.stub, "a2", "a", 1)
	servers := []*affServer{a0, b0, a1, b1, a2}

	// AllReverseTunnels lists them oldest first.
	all := h.AllReverseTunnels()
	if len(all) != len(servers) {
		t.Fatalf("AllReverseTunnels has %d tunnels; want %d", len(all), len(servers))
	}
	for i, s := range servers {
		if all[i] != s.tuns[0] {
			t.Fatalf("AllReverseTunnels[%d] is not server %s's tunnel", i, s.id)
		}
	}
	// Each tunnel was keyed once, before it was reported open once.
	waitFor(t, func() bool { _, opened, _ := rec.totals(); return opened == len(servers) })
	for _, s := range servers {
		if keyed, opened, closed := rec.counts(s.tuns[0]); keyed != 1 || opened != 1 || closed != 0 {
			t.Fatalf("server %s: AffinityKey called %d times, open reported %d times, close %d times; want 1, 1, 0", s.id, keyed, opened, closed)
		}
	}
	rec.mu.Lock()
	keyedBeforeOpen := rec.keyedBeforeOpen
	rec.mu.Unlock()
	if !keyedBeforeOpen {
		t.Fatal("OnReverseTunnelOpen ran before AffinityKey")
	}

	for _, cc := range []ReverseClientConnInterface{h.AsChannel(), h.KeyAsChannel("a"), h.KeyAsChannel("b")} {
		if !cc.Ready() {
			t.Fatal("not Ready with tunnels open")
		}
		if err := cc.WaitForReady(context.Background()); err != nil {
			t.Fatalf("WaitForReady with tunnels open: %v", err)
		}
	}
	affWantRoundRobin(t, affSpread(t, h.KeyAsChannel("a"), 30), []string{"a0", "a1", "a2"})
	affWantRoundRobin(t, affSpread(t, h.KeyAsChannel("b"), 30), []string{"b0", "b1"})
	affWantRoundRobin(t, affSpread(t, h.AsChannel(), 50), []string{"a0", "b0", "a1", "b1", "a2"})
	// A key nobody opened with, and the nil key (tunnels without the
	// header), reach nothing.
	for _, key := range []any{"zzz", nil} {
		if _, err := affCall(context.Background(), h.KeyAsChannel(key)); status.Code(err) != codes.Unavailable {
			t.Fatalf("KeyAsChannel(%v) with no such tunnel: %v; want Unavailable", key, err)
		}
	}

	t.Run("wait-for-ready", func(t *testing.T) {
		zzz := h.KeyAsChannel("zzz")
		if zzz.Ready() {
			t.Fatal(`KeyAsChannel("zzz") Ready with no such tunnel`)
		}
		// A WaitForReady call fails at once, without waiting.
		start := time.Now()
		_, err := affCall(context.Background(), zzz)
		wantCode(t, err, codes.Unavailable)
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("fail-fast call took %v", d)
		}
		// Waiting ends with the context.
		cancelled, cancel := context.WithCancel(context.Background())
		cancel()
		expired, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
		defer cancel2()
		if err := zzz.WaitForReady(cancelled); !errors.Is(err, context.Canceled) {
			t.Fatalf("WaitForReady(cancelled ctx) = %v; want context.Canceled", err)
		}
		if err := zzz.WaitForReady(expired); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("WaitForReady(expired ctx) = %v; want context.DeadlineExceeded", err)
		}
		_, err = affCall(cancelled, zzz, grpc.WaitForReady(true))
		wantCode(t, err, codes.Canceled)
		_, err = affCall(expired, zzz, grpc.WaitForReady(true))
		wantCode(t, err, codes.DeadlineExceeded)
		var served TunnelChannel
		_, err = affCall(expired, zzz, grpc.WaitForReady(true), WithTunnelChannel(&served))
		wantCode(t, err, codes.DeadlineExceeded)
		if served != nil {
			t.Fatal("WithTunnelChannel set for a call no tunnel carried")
		}

		// A waiting call and a WaitForReady both go through once a
		// tunnel with the key opens.
		type result struct {
			id  string
			err error
		}
		ctx, cancel3 := context.WithCancel(context.Background())
		defer cancel3()
		called := make(chan result, 1)
		waited := make(chan error, 1)
		go func() {
			id, err := affCall(ctx, zzz, grpc.WaitForReady(true))
			called <- result{id, err}
		}()
		go func() { waited <- zzz.WaitForReady(ctx) }()
		select {
		case r := <-called:
			t.Fatalf("WaitForReady call returned with no tunnel open: %q, %v", r.id, r.err)
		case err := <-waited:
			t.Fatalf("WaitForReady returned with no tunnel open: %v", err)
		default:
		}
		if zzz.Ready() {
			t.Fatal(`KeyAsChannel("zzz") Ready with no such tunnel`)
		}
		z := affOpen(t, h, ts.stub, "z", "zzz", 2)
		if r := recvWithin(t, called, "the waiting call"); r.err != nil || r.id != "z" {
			t.Fatalf("waiting call: %q, %v; want z", r.id, r.err)
		}
		if err := recvWithin(t, waited, "WaitForReady"); err != nil {
			t.Fatalf("WaitForReady: %v", err)
		}
		if !zzz.Ready() {
			t.Fatal(`KeyAsChannel("zzz") not Ready with its tunnels open`)
		}
		affWantRoundRobin(t, affSpread(t, zzz, 10), []string{"z"})
		affWantTunnels(t, h, a0.tuns, b0.tuns, a1.tuns, b1.tuns, a2.tuns, z.tuns)

		// Stopping the server takes both its tunnels away, and each is
		// reported closed once.
		z.rs.Stop()
		for range 2 {
			if r := recvWithin(t, z.res, "Serve to return after Stop"); !r.started || r.err != nil {
				t.Fatalf("Serve after Stop = (%v, %v); want (true, nil)", r.started, r.err)
			}
		}
		waitFor(t, func() bool { return len(h.AllReverseTunnels()) == len(servers) })
		affWantTunnels(t, h, a0.tuns, b0.tuns, a1.tuns, b1.tuns, a2.tuns)
		for _, tun := range z.tuns {
			recvWithin(t, tun.Done(), "a stopped server's tunnel to end")
			waitFor(t, func() bool { _, _, closed := rec.counts(tun); return closed > 0 })
			if keyed, opened, closed := rec.counts(tun); keyed != 1 || opened != 1 || closed != 1 {
				t.Fatalf("stopped tunnel: keyed %d, opened %d, closed %d times; want 1, 1, 1", keyed, opened, closed)
			}
		}
		if zzz.Ready() {
			t.Fatal(`KeyAsChannel("zzz") Ready after its tunnels closed`)
		}
		_, err = affCall(context.Background(), zzz)
		wantCode(t, err, codes.Unavailable)
	})

	t.Run("stop-one-server", func(t *testing.T) {
		b1.rs.Stop()
		if r := recvWithin(t, b1.res, "Serve to return after Stop"); !r.started || r.err != nil {
			t.Fatalf("Serve after Stop = (%v, %v); want (true, nil)", r.started, r.err)
		}
		recvWithin(t, b1.tuns[0].Done(), "the stopped server's tunnel to end")
		waitFor(t, func() bool { _, _, closed := rec.counts(b1.tuns[0]); return closed > 0 })
		affWantTunnels(t, h, a0.tuns, b0.tuns, a1.tuns, a2.tuns)
		if _, opened, closed := rec.counts(b1.tuns[0]); opened != 1 || closed != 1 {
			t.Fatalf("stopped tunnel: opened %d, closed %d times; want 1, 1", opened, closed)
		}
		affWantRoundRobin(t, affSpread(t, h.KeyAsChannel("b"), 10), []string{"b0"})
		affWantRoundRobin(t, affSpread(t, h.KeyAsChannel("a"), 30), []string{"a0", "a1", "a2"})
		affWantRoundRobin(t, affSpread(t, h.AsChannel(), 40), []string{"a0", "b0", "a1", "a2"})
	})

	t.Run("close-one-tunnel", func(t *testing.T) {
		tun := a0.tuns[0]
		tun.Close()
		recvWithin(t, tun.Done(), "the closed tunnel to end")
		if err := tun.Err(); err != nil {
			t.Fatalf("Err of a closed tunnel = %v; want nil", err)
		}
		if r := recvWithin(t, a0.res, "Serve to return after the handler closed its tunnel"); !r.started || r.err != nil {
			t.Fatalf("Serve after Close = (%v, %v); want (true, nil)", r.started, r.err)
		}
		affWantTunnels(t, h, b0.tuns, a1.tuns, a2.tuns)
		waitFor(t, func() bool { _, _, closed := rec.counts(tun); return closed > 0 })
		if _, opened, closed := rec.counts(tun); opened != 1 || closed != 1 {
			t.Fatalf("closed tunnel: opened %d, closed %d times; want 1, 1", opened, closed)
		}
		_, err := affCall(context.Background(), tun)
		wantCode(t, err, codes.Unavailable)
		affWantRoundRobin(t, affSpread(t, h.KeyAsChannel("a"), 20), []string{"a1", "a2"})
		affWantRoundRobin(t, affSpread(t, h.AsChannel(), 30), []string{"b0", "a1", "a2"})
	})

	// Stopping the rest empties the handler, and every tunnel that was
	// reported open was reported closed exactly once.
	for _, s := range []*affServer{b0, a1, a2} {
		s.rs.Stop()
		if r := recvWithin(t, s.res, "Serve to return after Stop"); !r.started || r.err != nil {
			t.Fatalf("server %s: Serve after Stop = (%v, %v); want (true, nil)", s.id, r.started, r.err)
		}
	}
	waitFor(t, func() bool { _, opened, closed := rec.totals(); return closed == opened })
	if n := len(h.AllReverseTunnels()); n != 0 {
		t.Fatalf("AllReverseTunnels has %d tunnels after every server stopped", n)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.opened) != 7 {
		t.Fatalf("%d tunnels reported open; want 7", len(rec.opened))
	}
	for tun, n := range rec.opened {
		if n != 1 || rec.closed[tun] != 1 || rec.keyed[tun] != 1 {
			t.Fatalf("a tunnel was keyed %d, opened %d, closed %d times; want 1 each", rec.keyed[tun], n, rec.closed[tun])
		}
	}
	if len(rec.closed) != len(rec.opened) || len(rec.keyed) != len(rec.opened) {
		t.Fatalf("%d tunnels keyed, %d opened, %d closed", len(rec.keyed), len(rec.opened), len(rec.closed))
	}
}

func TestAffinityTunnelChannelOfCall(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	h := ts.handler
	byTunnel := map[TunnelChannel]string{}
	for _, id := range []string{"s0", "s1", "s2"} {
		s := affOpen(t, h, ts.stub, id, "", 1)
		byTunnel[s.tuns[0]] = id
	}
	cc := h.AsChannel()

	seen := map[string]bool{}
	for i := range 6 {
		var ch TunnelChannel
		id, err := affCall(context.Background(), cc, WithTunnelChannel(&ch))
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if ch == nil {
			t.Fatalf("call %d: WithTunnelChannel left the channel nil", i)
		}
		if !slices.Contains(h.AllReverseTunnels(), ch) {
			t.Fatalf("call %d: WithTunnelChannel gave a tunnel not in AllReverseTunnels", i)
		}
		if byTunnel[ch] != id {
			t.Fatalf("call %d was answered by %s but WithTunnelChannel names %s's tunnel", i, id, byTunnel[ch])
		}
		seen[id] = true
	}
	if len(seen) != 3 {
		t.Fatalf("calls reached %v; want all three servers", seen)
	}

	// A failed call that a tunnel carried names it too.
	var ch TunnelChannel
	err := cc.Invoke(context.Background(), "/grpctunnel.test.Probe/Missing", bytesValue(nil), new(wrapperspb.BytesValue), WithTunnelChannel(&ch))
	wantCode(t, err, codes.Unimplemented)
	if _, ok := byTunnel[ch]; !ok {
		t.Fatal("WithTunnelChannel did not name the tunnel of a failed call")
	}

	// A failed pick leaves it alone.
	ch = nil
	_, err = affCall(context.Background(), h.KeyAsChannel("nobody"), WithTunnelChannel(&ch))
	wantCode(t, err, codes.Unavailable)
	if ch != nil {
		t.Fatal("WithTunnelChannel set for a call no tunnel carried")
	}

	for i := range 6 {
		ctx, cancel := context.WithCancel(context.Background())
		stream, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
		if err != nil {
			cancel()
			t.Fatalf("stream %d: %v", i, err)
		}
		tun := TunnelChannelFromContext(stream.Context())
		if tun == nil {
			cancel()
			t.Fatalf("stream %d: TunnelChannelFromContext is nil", i)
		}
		if !slices.Contains(h.AllReverseTunnels(), tun) {
			cancel()
			t.Fatalf("stream %d: TunnelChannelFromContext gave a tunnel not in AllReverseTunnels", i)
		}
		if err := stream.CloseSend(); err != nil {
			cancel()
			t.Fatal(err)
		}
		msg := new(wrapperspb.BytesValue)
		if err := stream.RecvMsg(msg); err != nil {
			cancel()
			t.Fatalf("stream %d: %v", i, err)
		}
		if got := string(msg.GetValue()); got != byTunnel[tun] {
			cancel()
			t.Fatalf("stream %d was answered by %s but its context names %s's tunnel", i, got, byTunnel[tun])
		}
		if err := stream.RecvMsg(msg); !errors.Is(err, io.EOF) {
			cancel()
			t.Fatalf("stream %d: end of stream: %v", i, err)
		}
		cancel()
	}
	if TunnelChannelFromContext(context.Background()) != nil {
		t.Fatal("TunnelChannelFromContext of a plain context is not nil")
	}
}

func TestAffinityNonComparableKey(t *testing.T) {
	rec := newAffRecorder(func(ch TunnelChannel) any {
		md, _ := metadata.FromIncomingContext(ch.Context())
		if v := md.Get("aff-bad"); len(v) > 0 {
			return v // a []string: not comparable
		}
		return affKey(ch)
	})
	ts := startServer(t, rec.options(), nil)
	h := ts.handler

	good := affOpen(t, h, ts.stub, "good", "k", 1)

	// The tunnel with the bad key is refused: Serve ends with an error
	// (without panicking the handler) and it never joins the pool.
	bad := NewReverseTunnelServer(ts.stub)
	bad.RegisterService(&probeDesc, affIDProbe("bad"))
	t.Cleanup(bad.Stop)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "aff-bad", "x", "aff-bad", "y")
	started, err := bad.Serve(ctx)
	if err == nil {
		t.Fatalf("Serve with a non-comparable affinity key = (%v, nil); want an error", started)
	}
	// The handler accepts the tunnel before it can compute the key, so the
	// tunnel did start; the handler then ends it with Internal.
	if !started {
		t.Fatalf("Serve with a non-comparable affinity key = (false, %v); want (true, Internal)", err)
	}
	wantCode(t, err, codes.Internal)

	affWantTunnels(t, h, good.tuns)
	keyed, opened, closed := rec.totals()
	if keyed != 2 || opened != 1 || closed != 0 {
		t.Fatalf("AffinityKey called %d times, open reported %d, close %d; want 2, 1, 0", keyed, opened, closed)
	}
	// The handler still works: old tunnels, new ones, and every channel.
	if id, err := affCall(context.Background(), h.KeyAsChannel("k")); err != nil || id != "good" {
		t.Fatalf("call on key k: %q, %v", id, err)
	}
	good2 := affOpen(t, h, ts.stub, "good2", "k", 1)
	affWantRoundRobin(t, affSpread(t, h.KeyAsChannel("k"), 10), []string{"good", "good2"})
	affWantRoundRobin(t, affSpread(t, h.AsChannel(), 10), []string{"good", "good2"})
	affWantTunnels(t, h, good.tuns, good2.tuns)
	// OnReverseTunnelOpen may lag the pool by a moment.
	waitFor(t, func() bool { _, opened, _ := rec.totals(); return opened == 2 })
	if _, _, closed := rec.totals(); closed != 0 {
		t.Fatalf("close reported %d times with every accepted tunnel open", closed)
	}
}

// TestAffinityKeyAsChannelNonComparable asks a handler for the tunnels of a
// key no tunnel can have, since it is not comparable. It should behave as
// any key without tunnels; it must not panic the caller.
func TestAffinityKeyAsChannelNonComparable(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{AffinityKey: affKey}, nil)
	affOpen(t, ts.handler, ts.stub, "k", "k", 1)
	cc := ts.handler.KeyAsChannel([]string{"x", "y"})
	noPanic := func(what string, fn func()) {
		t.Helper()
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("%s on KeyAsChannel([]string) panicked: %v", what, r)
			}
		}()
		fn()
	}
	noPanic("Ready", func() {
		if cc.Ready() {
			t.Fatal("Ready for a non-comparable key")
		}
	})
	noPanic("Invoke", func() {
		_, err := affCall(context.Background(), cc)
		wantCode(t, err, codes.Unavailable)
	})
	noPanic("NewStream", func() {
		_, err := cc.NewStream(context.Background(), probeStreamDesc, probeStream)
		wantCode(t, err, codes.Unavailable)
	})
	noPanic("WaitForReady", func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := cc.WaitForReady(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("WaitForReady(cancelled ctx) = %v; want context.Canceled", err)
		}
	})
}
