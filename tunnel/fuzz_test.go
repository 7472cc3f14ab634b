package tunnel

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// FuzzTunnelServer and FuzzTunnelClient feed one end of a tunnel an arbitrary
// sequence of frames from its peer, over an in-memory outer stream (no
// network, so an input costs well under a millisecond), then end the outer
// stream. Whatever the frames, the end must not panic, must not hang (every
// wait here is bounded, and a wait that runs out fails the input), must
// leave no goroutine behind once the tunnel is over, must give back every
// byte it charged to the tunnel's buffer budget, and what it sends must obey
// the protocol (fzWire lists the checks).
//
// An input is a flags byte, a second flags byte, then frames, each a uvarint
// length followed by that many bytes of a protobuf-encoded frame
// (ClientToServer for the server, ServerToClient for the client). A frame
// that does not decode is skipped; a length beyond the input takes the rest.
// See fzEncode, and the seeds below and under testdata/fuzz.
//
// Run them with, for instance,
//
//	go test ./tunnel -run '^$' -fuzz '^FuzzTunnelServer$' -fuzztime 60s -fuzzminimizetime 1s
//
// Without -fuzzminimizetime the engine may spend up to a minute minimizing
// each new input it finds, fuzzing nothing meanwhile.

// Flags, first byte.
const (
	fzNegotiated  = 1 << iota // both ends sent the negotiate header: settings, revision one
	fzBinaryMD                // binary-metadata extension
	fzTunnelClose             // tunnel-close extension
	fzReverse                 // a reverse tunnel
	fzBigChunks               // max-chunk extension at 64 KiB
	fzBrokenEnd               // the outer stream ends with an error, not a clean end
	fzDrain                   // drain the tunnel before the outer stream ends
	fzTightLimits             // small limits: 2 streams, 64 KiB buffered, 100000-byte messages, 1 KiB metadata
)

// Flags, second byte.
const (
	fzKeepalive     = 1 << iota // keepalive extension
	fzKeepaliveFast             // keepalive extension, pinging after 1ms and giving up 2ms later
	fzSmallWindows              // receive windows of 1 KiB (4 KiB at most), so that small inputs exercise flow control
	fzCompression               // compression extension
)

// fzMaxFrames bounds the frames of one input.
const fzMaxFrames = 256

// fzInput is a decoded fuzz input.
type fzInput struct {
	flags, flags2 byte
	frames        [][]byte
}

func (in fzInput) has(flag byte) bool { return in.flags&flag != 0 }

func fzSplit(data []byte) fzInput {
	var in fzInput
	if len(data) > 0 {
		in.flags, data = data[0], data[1:]
	}
	if len(data) > 0 {
		in.flags2, data = data[0], data[1:]
	}
	for len(data) > 0 && len(in.frames) < fzMaxFrames {
		n, k := binary.Uvarint(data)
		if k <= 0 {
			in.frames = append(in.frames, data)
			break
		}
		data = data[k:]
		n = min(n, uint64(len(data)))
		in.frames = append(in.frames, data[:n])
		data = data[n:]
	}
	return in
}

// fzEncode builds an input from flags and frames.
func fzEncode(flags, flags2 byte, frames ...proto.Message) []byte {
	out := []byte{flags, flags2}
	for _, f := range frames {
		b, err := proto.Marshal(f)
		if err != nil {
			panic(err)
		}
		out = binary.AppendUvarint(out, uint64(len(b)))
		out = append(out, b...)
	}
	return out
}

// agreement and options of the end under test.
func (in fzInput) agreement() agreement {
	a := agreement{
		negotiated:     in.has(fzNegotiated),
		binaryMetadata: in.has(fzBinaryMD),
		tunnelClose:    in.has(fzTunnelClose),
		keepalive:      in.flags2&(fzKeepalive|fzKeepaliveFast) != 0,
		compression:    in.flags2&fzCompression != 0,
		maxChunk:       flowcontrol.MaxChunk,
	}
	if in.has(fzBigChunks) {
		a.maxChunk = 64 << 10
	}
	return a
}

func (in fzInput) options() *options {
	var opts []TunnelOption
	if in.has(fzTightLimits) {
		opts = append(opts, WithMaxConcurrentStreams(2), WithMaxBufferedBytes(64<<10),
			WithMaxRecvMsgSize(100_000), WithMaxHeaderListSize(1024))
	}
	if in.flags2&fzKeepaliveFast != 0 {
		opts = append(opts, WithKeepalive(time.Millisecond, 2*time.Millisecond))
	}
	if in.flags2&fzSmallWindows != 0 {
		opts = append(opts, WithInitialWindowSize(1024), WithMaxWindowSize(4096))
	}
	return newOptions(opts)
}

func (in fzInput) end() error {
	if in.has(fzBrokenEnd) {
		return errors.New("fz: outer stream broken")
	}
	return io.EOF
}

// fzWait is how long any one wait of the harness may take before the input
// counts as a hang.
const fzWait = 10 * time.Second

// fzAwait polls cond until it holds or d passes, and reports whether it held.
func fzAwait(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for spins := 0; !cond(); spins++ {
		if time.Now().After(deadline) {
			return false
		}
		if spins < 1000 {
			runtime.Gosched()
		} else {
			time.Sleep(50 * time.Microsecond)
		}
	}
	return true
}

// fzSettle waits briefly for the ends' goroutines to have nothing left to do
// but wait for frames: idle must hold on several looks in a row. It gives up
// quietly, since a goroutine may legitimately stay busy.
func fzSettle(idle func() bool) {
	calm := 0
	fzAwait(100*time.Millisecond, func() bool {
		if idle() {
			calm++
		} else {
			calm = 0
		}
		return calm >= 3
	})
}

// fzGoroutines returns the stacks of live goroutines.
func fzGoroutines() []string {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Split(string(buf[:n]), "\n\n")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// fzCheckLeaks fails the input if goroutines it started are still running
// this package's code once its tunnel is over. before is the number of
// goroutines there were before the input: when the count is back there,
// which is the common case and costs nothing to check, nothing leaked.
// Otherwise it waits for the count to come down, then looks at stacks.
func fzCheckLeaks(t *testing.T, before int) {
	if fzAwait(time.Second, func() bool { return runtime.NumGoroutine() <= before }) {
		return
	}
	var leaked []string
	if !fzAwait(fzWait, func() bool {
		leaked = leaked[:0]
		for i, g := range fzGoroutines() {
			// The first is this goroutine's own.
			if i > 0 && strings.Contains(g, "grpctunnel/grpctunnel/tunnel.") {
				leaked = append(leaked, g)
			}
		}
		return len(leaked) == 0
	}) {
		t.Fatalf("goroutines left behind:\n\n%s", strings.Join(leaked, "\n\n"))
	}
}

// fzWithin waits for ch to close or deliver, failing the input as a hang if
// it takes longer than fzWait.
func fzWithin[T any](t *testing.T, ch <-chan T, what string) {
	timer := time.NewTimer(fzWait)
	defer timer.Stop()
	select {
	case <-ch:
	case <-timer.C:
		fzHang(t, what)
	}
}

// fzHang fails the input as a hang, with every goroutine's stack.
func fzHang(t *testing.T, what string) {
	t.Fatalf("hang: %s after %v\n\n%s", what, fzWait, strings.Join(fzGoroutines(), "\n\n"))
}

// fzStreamOut follows what one end sent on one stream, to check it.
type fzStreamOut struct {
	active     bool // a message is in progress
	remaining  int  // its bytes still to come
	sent       int64
	closed     bool // close_stream (server) sent
	halfClosed bool // half_close (client) sent
}

// fzWire checks the frames one end sends. It knows what the peer's frames
// delivered so far allow: which streams exist, and how much window each
// direction was given.
type fzWire struct {
	mu        sync.Mutex
	problems  []string
	frames    int
	maxChunk  int
	streams   map[int64]*fzStreamOut
	flowCtl   map[int64]bool  // streams under flow control
	credit    map[int64]int64 // window given by the peer: initial plus updates
	maxOpened int64           // highest stream the checks allow frames for
}

func newFzWire(maxChunk int) *fzWire {
	return &fzWire{maxChunk: maxChunk, streams: map[int64]*fzStreamOut{}, flowCtl: map[int64]bool{}, credit: map[int64]int64{}}
}

func (w *fzWire) problem(format string, args ...any) {
	if len(w.problems) < 20 {
		w.problems = append(w.problems, fmt.Sprintf(format, args...))
	}
}

func (w *fzWire) stream(id int64) *fzStreamOut {
	s := w.streams[id]
	if s == nil {
		s = &fzStreamOut{}
		w.streams[id] = s
	}
	return s
}

// data checks a message chunk: first is a message frame of size bytes.
func (w *fzWire) data(id int64, first bool, size uint32, chunk []byte) {
	s := w.stream(id)
	if len(chunk) > w.maxChunk {
		w.problem("stream %d: chunk of %d bytes, more than the agreed %d", id, len(chunk), w.maxChunk)
	}
	if first {
		if s.active {
			w.problem("stream %d: message started before the previous one ended", id)
		}
		if len(chunk) > int(size) {
			w.problem("stream %d: first chunk of %d bytes overruns the declared size %d", id, len(chunk), size)
		}
		s.remaining = int(size) - len(chunk)
	} else {
		if !s.active {
			w.problem("stream %d: data with no message started", id)
		}
		if len(chunk) > s.remaining {
			w.problem("stream %d: chunk of %d bytes overruns the %d left of the message", id, len(chunk), s.remaining)
		}
		s.remaining -= len(chunk)
	}
	s.active = s.remaining > 0
	s.sent += int64(len(chunk))
	if w.flowCtl[id] && s.sent > w.credit[id] {
		w.problem("stream %d: %d bytes sent against a window of %d", id, s.sent, w.credit[id])
	}
}

func (w *fzWire) report(t *testing.T) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.problems) > 0 {
		t.Fatalf("protocol broken by this end:\n%s", strings.Join(w.problems, "\n"))
	}
}

// fzMarshal encodes a frame as gRPC would before sending it, which catches
// frames that could not travel (strings that are not UTF-8, say). Message
// data holds no string, and is skipped to save copying it.
func fzMarshal(m proto.Message, data bool) error {
	if data {
		return nil
	}
	_, err := proto.Marshal(m)
	return err
}

// Server side.

// fzServerFrames is an in-memory outer stream for a tunnel server: Recv
// hands out the input's frames, then blocks until the harness releases it
// with the end error; Send checks each frame and drops it.
type fzServerFrames struct {
	*fzWire
	in                         []*tunnelpb.ClientToServer
	next                       int // reader-owned
	negotiated                 bool
	pingsAllowed, closeAllowed bool // frames on stream -1 this end may send
	atEnd                      chan struct{}
	release                    chan struct{}
	end                        error
	closedOut                  atomic.Bool // the tunnel is over: no more sends
}

func (f *fzServerFrames) Recv() (*tunnelpb.ClientToServer, error) {
	if f.next < len(f.in) {
		fr := f.in[f.next]
		f.next++
		f.mu.Lock()
		f.deliver(fr)
		f.mu.Unlock()
		return fr, nil
	}
	if f.next == len(f.in) {
		f.next++
		close(f.atEnd)
	}
	<-f.release
	return nil, f.end
}

// deliver records what a frame from the tunnel client allows the server.
func (f *fzServerFrames) deliver(fr *tunnelpb.ClientToServer) {
	id := fr.GetStreamId()
	switch x := fr.GetFrame().(type) {
	case *tunnelpb.ClientToServer_NewStream:
		if id > f.maxOpened {
			f.maxOpened = id
			flow := f.negotiated && x.NewStream.GetProtocolRevision() == tunnelpb.ProtocolRevision_REVISION_ONE
			f.flowCtl[id] = flow
			if w := x.NewStream.GetInitialWindowSize(); w != 0 {
				f.credit[id] = int64(w)
			} else {
				f.credit[id] = flowcontrol.DefaultWindow
			}
		}
	case *tunnelpb.ClientToServer_WindowUpdate:
		if id > 0 {
			f.credit[id] += int64(x.WindowUpdate)
		}
	}
}

func (f *fzServerFrames) Send(fr *tunnelpb.ServerToClient) error {
	if err := fzMarshal(fr, fr.GetResponseMessage() != nil || fr.GetMoreResponseData() != nil); err != nil {
		f.mu.Lock()
		f.problem("unencodable frame %v: %v", fr, err)
		f.mu.Unlock()
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closedOut.Load() {
		f.problem("frame sent after the tunnel was over: %v", fr)
	}
	first := f.frames == 0
	f.frames++
	id := fr.GetStreamId()
	switch x := fr.GetFrame().(type) {
	case nil:
		f.problem("frame of no type: %v", fr)
	case *tunnelpb.ServerToClient_Settings:
		if !first || !f.negotiated || id != settingsStreamID {
			f.problem("settings not as the first frame of a negotiated tunnel: %v", fr)
		}
		return nil
	default:
		if first && f.negotiated {
			f.problem("first frame is not settings: %v", fr)
		}
		if id == settingsStreamID {
			_, isPong := x.(*tunnelpb.ServerToClient_WindowUpdate)
			_, isClose := x.(*tunnelpb.ServerToClient_CloseStream)
			if !(isPong && f.pingsAllowed) && !(isClose && f.closeAllowed) {
				f.problem("frame on stream -1: %v", fr)
			}
			return nil
		}
		if id <= 0 || id > f.maxOpened {
			f.problem("frame for stream %d, which the peer never opened: %v", id, fr)
			return nil
		}
	}
	switch x := fr.GetFrame().(type) {
	case *tunnelpb.ServerToClient_ResponseMessage:
		f.data(id, true, x.ResponseMessage.GetSize(), x.ResponseMessage.GetData())
	case *tunnelpb.ServerToClient_MoreResponseData:
		f.data(id, false, 0, x.MoreResponseData)
	case *tunnelpb.ServerToClient_CloseStream:
		s := f.stream(id)
		if s.closed {
			f.problem("stream %d closed twice", id)
		}
		s.closed = true
	}
	return nil
}

// fzService is the service the fuzzed tunnel server serves. Its handlers
// count themselves busy except while they wait on the tunnel, so that the
// harness can tell when they have nothing left to do.
type fzService struct {
	busy    atomic.Int64
	mu      sync.Mutex
	started map[int64]bool
}

func (s *fzService) enter(id int64) {
	s.busy.Add(1)
	s.mu.Lock()
	s.started[id] = true
	s.mu.Unlock()
}

func (s *fzService) leave() { s.busy.Add(-1) }

// wait runs a call that may block on the tunnel.
func (s *fzService) wait(f func() error) error {
	s.busy.Add(-1)
	defer s.busy.Add(1)
	return f()
}

func fzStreamID(ss grpc.ServerStream) int64 {
	if st, ok := ss.(*serverStream); ok {
		return st.id
	}
	return 0
}

// fzMid is a response of 8 KB; it is only ever read.
var fzMid = bytesValue(make([]byte, 8_000))

var fzDesc = grpc.ServiceDesc{
	ServiceName: "f.F",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		// U is unary: it echoes, and the first byte of the request picks
		// a variation: h sends headers, t sets trailers, e fails, b
		// answers with 20 KB (more than a chunk).
		MethodName: "U",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			s := srv.(*fzService)
			var id int64
			if ts, ok := grpc.ServerTransportStreamFromContext(ctx).(*transportStream); ok {
				id = ts.id
			}
			s.enter(id)
			defer s.leave()
			in := new(wrapperspb.BytesValue)
			if err := s.wait(func() error { return dec(in) }); err != nil {
				return nil, err
			}
			v := in.GetValue()
			switch {
			case len(v) == 0:
			case v[0] == 'h':
				if err := s.wait(func() error { return grpc.SendHeader(ctx, metadata.Pairs("h", "1", "h-bin", "\x00\xff")) }); err != nil {
					return nil, err
				}
			case v[0] == 't':
				_ = grpc.SetTrailer(ctx, metadata.Pairs("t", "2", "t-bin", "\xff"))
			case v[0] == 'e':
				return nil, status.Error(codes.Aborted, "fz: as asked")
			case v[0] == 'b':
				return fzBig, nil
			}
			return in, nil
		},
	}},
	Streams: []grpc.StreamDesc{
		{StreamName: "S", ServerStreams: true, ClientStreams: true, Handler: func(srv any, ss grpc.ServerStream) error {
			// S echoes every message until the client half-closes.
			s := srv.(*fzService)
			s.enter(fzStreamID(ss))
			defer s.leave()
			for {
				m := new(wrapperspb.BytesValue)
				if err := s.wait(func() error { return ss.RecvMsg(m) }); err != nil {
					if errors.Is(err, io.EOF) {
						return nil
					}
					return err
				}
				if err := s.wait(func() error { return ss.SendMsg(m) }); err != nil {
					return err
				}
			}
		}},
		{StreamName: "B", ServerStreams: true, Handler: func(srv any, ss grpc.ServerStream) error {
			// B reads one request, then sends three messages of 8 KB.
			s := srv.(*fzService)
			s.enter(fzStreamID(ss))
			defer s.leave()
			if err := s.wait(func() error { return ss.RecvMsg(new(wrapperspb.BytesValue)) }); err != nil {
				return err
			}
			m := fzMid
			for range 3 {
				if err := s.wait(func() error { return ss.SendMsg(m) }); err != nil {
					return err
				}
			}
			return nil
		}},
		{StreamName: "H", ServerStreams: true, ClientStreams: true, Handler: func(srv any, ss grpc.ServerStream) error {
			// H sends headers, then holds the call until it ends.
			s := srv.(*fzService)
			s.enter(fzStreamID(ss))
			defer s.leave()
			if err := s.wait(func() error { return ss.SendHeader(metadata.Pairs("held", "yes")) }); err != nil {
				return err
			}
			_ = s.wait(func() error { <-ss.Context().Done(); return nil })
			return ss.Context().Err()
		}},
	},
}

// fzStuck reports whether a stream without flow control holds more than its
// share of messages, which makes the tunnel's reader wait for its consumer
// (PROTOCOL.md, revision zero): an idle consumer then stalls the reader, as
// designed, until the network client goes away.
func fzStuck(ins []*inbound) bool {
	for _, in := range ins {
		in.mu.Lock()
		stuck := in.win == nil && in.queued > in.hold && in.err == nil
		in.mu.Unlock()
		if stuck {
			return true
		}
	}
	return false
}

func fzRunServer(t *testing.T, data []byte) {
	before := runtime.NumGoroutine()
	in := fzSplit(data)
	agreed := in.agreement()
	frames := &fzServerFrames{
		fzWire:       newFzWire(agreed.maxChunk),
		negotiated:   agreed.negotiated,
		pingsAllowed: agreed.keepalive,
		closeAllowed: agreed.tunnelClose && !in.has(fzReverse),
		atEnd:        make(chan struct{}),
		release:      make(chan struct{}),
		end:          in.end(),
	}
	for _, b := range in.frames {
		f := new(tunnelpb.ClientToServer)
		if proto.Unmarshal(b, f) == nil {
			frames.in = append(frames.in, f)
		}
	}
	svc := newServices()
	impl := &fzService{started: map[int64]bool{}}
	svc.RegisterService(&fzDesc, impl)
	ctx, goAway := context.WithCancel(context.Background())
	defer goAway()
	ts := newTunnelServer(ctx, frames, in.options(), svc, agreed, in.has(fzReverse), nil, nil)
	if in.has(fzReverse) {
		ts.closeSend = func() error { return nil }
		ts.abort = goAway
	} else {
		ts.askPeerToClose = agreed.tunnelClose
	}
	served := make(chan error, 1)
	go func() { served <- ts.serve(true) }()

	streams := func() []*serverStream {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		out := make([]*serverStream, 0, len(ts.streams))
		for _, st := range ts.streams {
			out = append(out, st)
		}
		return out
	}
	idle := func() bool {
		if impl.busy.Load() != 0 {
			return false
		}
		impl.mu.Lock()
		defer impl.mu.Unlock()
		for _, st := range streams() {
			if !impl.started[st.id] {
				return false
			}
		}
		return true
	}
	stuck := func() bool {
		var ins []*inbound
		for _, st := range streams() {
			ins = append(ins, st.in)
		}
		return fzStuck(ins)
	}
	// The reader takes every frame, unless the tunnel ends first or a
	// revision-zero stream stalls it.
	stalled := false
	if !fzAwait(fzWait, func() bool {
		select {
		case <-frames.atEnd:
			return true
		case <-ts.done:
			return true
		default:
		}
		stalled = idle() && stuck()
		return stalled
	}) {
		fzHang(t, "the tunnel server's reader made no progress")
	}
	fzSettle(idle)
	if in.has(fzDrain) {
		ts.drain()
	}
	if stalled {
		goAway() // the network client goes away
	}
	close(frames.release)
	// Any end is fine; what matters is that it ended.
	fzWithin(t, served, "the tunnel server did not end")
	frames.closedOut.Store(true)
	fzCheckLeaks(t, before)
	if used := ts.buffered.used.Load(); used != 0 {
		t.Fatalf("%d bytes still charged to the tunnel's budget after it ended", used)
	}
	frames.report(t)
}

// Client side.

// fzClientFrames is an in-memory outer stream for a tunnel client. The
// settings (the first frame of a negotiated tunnel) go out at once; the rest
// wait for gate, which the harness opens once its calls have started, so
// that the input's stream IDs meet calls that exist.
type fzClientFrames struct {
	*fzWire
	in           []*tunnelpb.ServerToClient
	next         int // reader-owned
	handshake    bool
	gate         chan struct{}
	atEnd        chan struct{}
	release      chan struct{}
	end          error
	lastNew      int64
	pingsAllowed bool // pongs on stream -1
	closeAllowed bool // cancel on stream -1
	closedOut    atomic.Bool
}

func (f *fzClientFrames) Recv() (*tunnelpb.ServerToClient, error) {
	if f.next > 0 || !f.handshake {
		<-f.gate
	}
	if f.next < len(f.in) {
		fr := f.in[f.next]
		f.next++
		f.mu.Lock()
		if wu, ok := fr.GetFrame().(*tunnelpb.ServerToClient_WindowUpdate); ok && fr.GetStreamId() > 0 {
			f.credit[fr.GetStreamId()] += int64(wu.WindowUpdate)
		}
		f.mu.Unlock()
		return fr, nil
	}
	if f.next == len(f.in) {
		f.next++
		close(f.atEnd)
	}
	<-f.release
	return nil, f.end
}

func (f *fzClientFrames) Send(fr *tunnelpb.ClientToServer) error {
	if err := fzMarshal(fr, fr.GetRequestMessage() != nil || fr.GetMoreRequestData() != nil); err != nil {
		f.mu.Lock()
		f.problem("unencodable frame %v: %v", fr, err)
		f.mu.Unlock()
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closedOut.Load() {
		f.problem("frame sent after the tunnel was over: %v", fr)
	}
	f.frames++
	id := fr.GetStreamId()
	switch x := fr.GetFrame().(type) {
	case nil:
		f.problem("frame of no type: %v", fr)
		return nil
	case *tunnelpb.ClientToServer_NewStream:
		if id != f.lastNew+1 {
			f.problem("new_stream %d after %d", id, f.lastNew)
		}
		f.lastNew = id
		f.maxOpened = max(f.maxOpened, id)
		return nil
	default:
		if id == settingsStreamID {
			_, isPong := x.(*tunnelpb.ClientToServer_WindowUpdate)
			_, isClose := x.(*tunnelpb.ClientToServer_Cancel)
			if !(isPong && f.pingsAllowed) && !(isClose && f.closeAllowed) {
				f.problem("frame on stream -1: %v", fr)
			}
			return nil
		}
		if id <= 0 || id > f.lastNew {
			f.problem("frame for stream %d, never opened: %v", id, fr)
			return nil
		}
	}
	s := f.stream(id)
	switch x := fr.GetFrame().(type) {
	case *tunnelpb.ClientToServer_RequestMessage:
		if s.halfClosed {
			f.problem("stream %d: message after half-close", id)
		}
		f.data(id, true, x.RequestMessage.GetSize(), x.RequestMessage.GetData())
	case *tunnelpb.ClientToServer_MoreRequestData:
		if s.halfClosed {
			f.problem("stream %d: data after half-close", id)
		}
		f.data(id, false, 0, x.MoreRequestData)
	case *tunnelpb.ClientToServer_HalfClose:
		if s.halfClosed {
			f.problem("stream %d: half-closed twice", id)
		}
		s.halfClosed = true
	}
	return nil
}

// fzCallers runs the calls of FuzzTunnelClient, each counted busy except
// while it waits on the tunnel.
type fzCallers struct {
	busy atomic.Int64
	wg   sync.WaitGroup
}

func (c *fzCallers) wait(f func() error) error {
	c.busy.Add(-1)
	defer c.busy.Add(1)
	return f()
}

func (c *fzCallers) run(f func()) <-chan struct{} {
	done := make(chan struct{})
	c.busy.Add(1)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer close(done)
		defer c.busy.Add(-1)
		f()
	}()
	return done
}

var (
	// fzBig is larger than a chunk of 16 KiB, and than the window of a
	// peer that announces a small one; it is only ever read.
	fzBig          = bytesValue(make([]byte, 20_000))
	fzBidi         = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	fzServerStream = &grpc.StreamDesc{ServerStreams: true}
)

// fzRecvAll receives until the call ends.
func fzRecvAll(c *fzCallers, cs grpc.ClientStream) {
	for c.wait(func() error { return cs.RecvMsg(new(wrapperspb.BytesValue)) }) == nil {
	}
}

// fzCalls are the calls in progress while FuzzTunnelClient's frames arrive;
// the i-th gets stream ID i+1.
var fzCalls = []func(ctx context.Context, c *fzCallers, cc grpc.ClientConnInterface){
	// 1: unary.
	func(ctx context.Context, c *fzCallers, cc grpc.ClientConnInterface) {
		var hdr, trl metadata.MD
		_ = c.wait(func() error {
			return cc.Invoke(ctx, "/f.F/U", bytesValue([]byte("u")), new(wrapperspb.BytesValue), grpc.Header(&hdr), grpc.Trailer(&trl))
		})
	},
	// 2: bidi, with a message larger than the window.
	func(ctx context.Context, c *fzCallers, cc grpc.ClientConnInterface) {
		var cs grpc.ClientStream
		if c.wait(func() (err error) { cs, err = cc.NewStream(ctx, fzBidi, "/f.F/S"); return err }) != nil {
			return
		}
		_ = c.wait(func() error { return cs.SendMsg(bytesValue([]byte("s"))) })
		_ = c.wait(func() error { return cs.SendMsg(fzBig) })
		_ = cs.CloseSend()
		fzRecvAll(c, cs)
		_ = cs.Trailer()
	},
	// 3: server streaming, reading the headers first.
	func(ctx context.Context, c *fzCallers, cc grpc.ClientConnInterface) {
		var cs grpc.ClientStream
		if c.wait(func() (err error) { cs, err = cc.NewStream(ctx, fzServerStream, "/f.F/B"); return err }) != nil {
			return
		}
		_ = c.wait(func() error { return cs.SendMsg(bytesValue([]byte("b"))) })
		_ = c.wait(func() error { _, err := cs.Header(); return err })
		fzRecvAll(c, cs)
	},
	// 4: bidi that the caller cancels after its first response.
	func(ctx context.Context, c *fzCallers, cc grpc.ClientConnInterface) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		var cs grpc.ClientStream
		if c.wait(func() (err error) { cs, err = cc.NewStream(ctx, fzBidi, "/f.F/H"); return err }) != nil {
			return
		}
		if c.wait(func() error { return cs.RecvMsg(new(wrapperspb.BytesValue)) }) == nil {
			cancel()
		}
		fzRecvAll(c, cs)
	},
}

func fzRunClient(t *testing.T, data []byte) {
	before := runtime.NumGoroutine()
	in := fzSplit(data)
	agreed := in.agreement()
	reverse := in.has(fzReverse)
	frames := &fzClientFrames{
		fzWire:       newFzWire(agreed.maxChunk),
		handshake:    agreed.negotiated,
		gate:         make(chan struct{}),
		atEnd:        make(chan struct{}),
		release:      make(chan struct{}),
		end:          in.end(),
		pingsAllowed: agreed.keepalive,
		closeAllowed: agreed.tunnelClose && reverse,
	}
	for _, b := range in.frames {
		f := new(tunnelpb.ServerToClient)
		if proto.Unmarshal(b, f) == nil {
			frames.in = append(frames.in, f)
		}
	}
	// The window this end's requests get: what the settings said, under
	// revision one; the checks follow the client's own decision.
	var flowCtl bool
	peerWindow := int64(flowcontrol.DefaultWindow)
	if agreed.negotiated && len(frames.in) > 0 {
		if s := frames.in[0].GetSettings(); s != nil && frames.in[0].GetStreamId() == settingsStreamID {
			rev, err := chooseRevision(s.GetSupportedProtocolRevisions())
			flowCtl = err == nil && rev == tunnelpb.ProtocolRevision_REVISION_ONE
			if w := s.GetInitialWindowSize(); w != 0 {
				peerWindow = int64(w)
			}
		}
	}
	for id := int64(1); id <= int64(len(fzCalls)); id++ {
		frames.flowCtl[id] = flowCtl
		frames.credit[id] = peerWindow
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tc := newTunnelClient(ctx, cancel, frames, in.options(), agreed, reverse, nil)
	tc.askPeerToClose = agreed.tunnelClose && reverse
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		tc.readLoop()
		tc.out.Close(errTunnelClosed)
	}()

	// Start the calls one after another, so that they get stream IDs in
	// order, and open the gate once every new_stream went out; a call that
	// fails before it has a stream is over at once.
	callCtx, stopCalls := context.WithCancel(context.Background())
	defer stopCalls()
	callers := &fzCallers{}
	// A tunnel whose settings never come (the input ran out before them)
	// takes no call until the outer stream ends.
	for i, call := range fzCalls {
		done := callers.run(func() { call(callCtx, callers, tc) })
		waiting := false
		if !fzAwait(fzWait, func() bool {
			select {
			case <-done:
				return true
			case <-frames.atEnd:
				waiting = true
				return true
			default:
			}
			// Its new_stream has gone out: the peer may answer it.
			frames.mu.Lock()
			defer frames.mu.Unlock()
			return frames.lastNew > int64(i)
		}) {
			fzHang(t, fmt.Sprintf("call %d did not start", i+1))
		}
		if waiting {
			break
		}
	}
	close(frames.gate)

	streams := func() []*clientStream {
		tc.mu.Lock()
		defer tc.mu.Unlock()
		out := make([]*clientStream, 0, len(tc.streams))
		for _, st := range tc.streams {
			out = append(out, st)
		}
		return out
	}
	idle := func() bool { return callers.busy.Load() == 0 }
	stuck := func() bool {
		var ins []*inbound
		for _, st := range streams() {
			ins = append(ins, st.in)
		}
		return fzStuck(ins)
	}
	stalled := false
	if !fzAwait(fzWait, func() bool {
		select {
		case <-frames.atEnd:
			return true
		case <-tc.done:
			return true
		default:
		}
		stalled = idle() && stuck()
		return stalled
	}) {
		fzHang(t, "the tunnel client's reader made no progress")
	}
	fzSettle(idle)
	if in.has(fzDrain) {
		tc.drain()
	}
	if stalled {
		tc.Close()
	}
	close(frames.release)
	fzWithin(t, readerDone, "the tunnel client did not end")
	callsDone := make(chan struct{})
	go func() {
		callers.wg.Wait()
		close(callsDone)
	}()
	fzWithin(t, callsDone, "calls did not end with their tunnel")
	frames.closedOut.Store(true)
	// Goroutines that outlive their calls (a context.AfterFunc, say) may
	// still be releasing bytes; the budget is checked once they are gone.
	fzCheckLeaks(t, before)
	if used := tc.buffered.used.Load(); used != 0 {
		t.Fatalf("%d bytes still charged to the tunnel's budget after it ended", used)
	}
	frames.report(t)
}

// fzSeq flattens frames and groups of frames.
func fzSeq[F proto.Message](parts ...any) []proto.Message {
	var out []proto.Message
	for _, p := range parts {
		switch x := p.(type) {
		case F:
			out = append(out, x)
		case []F:
			for _, f := range x {
				out = append(out, f)
			}
		default:
			panic(fmt.Sprintf("fzSeq: %T", p))
		}
	}
	return out
}

type fzSeed struct {
	name          string
	flags, flags2 byte
	frames        []proto.Message
	onDisk        bool // committed under testdata/fuzz; otherwise added with f.Add
}

func (s fzSeed) bytes() []byte { return fzEncode(s.flags, s.flags2, s.frames...) }

func fzServerSeeds() []fzSeed {
	type C = *tunnelpb.ClientToServer
	seq := fzSeq[C]
	hc := halfCloseFrame
	wu := windowUpdateFrame
	return []fzSeed{
		{"unary", fzNegotiated, 0, seq(newStreamFrame(1, "/f.F/U", rev1, 65536), requestFrames(1, []byte("hello")), hc(1)), true},
		{"chunked", fzNegotiated, 0, seq(newStreamFrame(1, "/f.F/S", rev1, 65536), requestFrames(1, []byte(strings.Repeat("chunk", 200)), 300), requestFrames(1, []byte("x")), hc(1)), true},
		{"window-updates", fzNegotiated, fzSmallWindows, seq(newStreamFrame(1, "/f.F/B", rev1, 1000), requestFrames(1, nil), hc(1), wu(1, 3000), wu(1, 5000), wu(1, 16000)), true},
		{"cancel", fzNegotiated, 0, seq(newStreamFrame(1, "/f.F/H", rev1, 65536), cancelFrame(1), newStreamFrame(2, "/f.F/U", rev1, 65536), requestFrames(2, []byte("after")), hc(2)), true},
		{"protocol-violations", fzNegotiated, 0, seq(newStreamFrame(1, "/f.F/S", rev1, 65536), requestFrames(1, []byte("a")), &tunnelpb.ClientToServer{StreamId: 1}, newStreamFrame(1, "/f.F/U", rev1, 65536), wu(9, 1)), true},
		{"revision-zero", 0, fzSmallWindows, seq(newStreamFrame(1, "/f.F/U", rev0, 0), requestFrames(1, []byte("old")), hc(1), newStreamFrame(2, "/f.F/S", rev0, 0), requestFrames(2, make([]byte, 1500)), requestFrames(2, make([]byte, 1500)), hc(2)), false},
		{"revision-zero-stall", 0, fzSmallWindows, seq(newStreamFrame(1, "/f.F/H", rev0, 0), requestFrames(1, make([]byte, 800)), requestFrames(1, make([]byte, 800)), newStreamFrame(2, "/f.F/U", rev0, 0)), false},
		{"stream-violations", fzNegotiated, 0, seq(
			newStreamFrame(1, "/f.F/S", rev1, 65536), messageFrame(1, 2, []byte("xyz")),
			newStreamFrame(2, "/f.F/S", rev1, 65536), messageFrame(2, 1<<32-1, []byte("x")),
			newStreamFrame(3, "/f.F/S", rev1, 65536), wu(3, 0x7FFFFFFF), wu(3, 0x7FFFFFFF),
			newStreamFrame(4, "/f.F/H", rev1, 65536), hc(4), requestFrames(4, []byte("late")),
			newStreamFrame(5, "/f.F/S", rev1, 65536), moreFrame(5, []byte("x")),
			newStreamFrame(6, "nomethod", rev1, 65536), newStreamFrame(7, "/f.F/U", 9, 65536),
		), false},
		{"window-overrun", fzNegotiated, fzSmallWindows, seq(newStreamFrame(1, "/f.F/H", rev1, 65536), requestFrames(1, make([]byte, 700)), requestFrames(1, make([]byte, 700)), newStreamFrame(2, "/f.F/S", rev1, 65536), requestFrames(2, make([]byte, 3000))), false},
		{"metadata", fzNegotiated | fzBinaryMD, 0, seq(
			newStreamFrame(1, "/f.F/U", rev1, 65536, "grpc-timeout", "1S", "x-bin", "AP8", "k", "v"), requestFrames(1, []byte("h")), hc(1),
			newStreamFrame(2, "/f.F/U", rev1, 65536, "x-bin", "!!"), newStreamFrame(3, "/f.F/U", rev1, 65536, "grpc-timeout", "1n"), requestFrames(3, []byte("t")), hc(3),
			newStreamFrame(4, "/f.F/U", rev1, 65536), requestFrames(4, []byte("e")), hc(4),
		), false},
		{"big-response", fzNegotiated | fzBigChunks, 0, seq(newStreamFrame(1, "/f.F/U", rev1, 1000), requestFrames(1, []byte("b")), hc(1), wu(1, 30000)), false},
		{"reverse-tunnel-close", fzNegotiated | fzTunnelClose | fzReverse, 0, seq(newStreamFrame(1, "/f.F/H", rev1, 65536), cancelFrame(-1)), false},
		{"forward-tunnel-close-drain", fzNegotiated | fzTunnelClose | fzDrain, 0, seq(newStreamFrame(1, "/f.F/U", rev1, 65536), requestFrames(1, nil), hc(1), newStreamFrame(2, "/f.F/S", rev1, 65536)), false},
		{"tight-limits-broken-end", fzNegotiated | fzTightLimits | fzBrokenEnd, 0, seq(
			newStreamFrame(1, "/f.F/H", rev1, 65536), newStreamFrame(2, "/f.F/H", rev1, 65536), newStreamFrame(3, "/f.F/H", rev1, 65536),
			newStreamFrame(4, "/f.F/S", rev1, 65536, "big", strings.Repeat("m", 1100)), messageFrame(1, 200_000, nil),
		), false},
		{"keepalive", fzNegotiated, fzKeepalive, seq(wu(-1, pingBit|1), wu(-1, 1), newStreamFrame(1, "/f.F/U", rev1, 65536), requestFrames(1, nil), hc(1)), false},
		{"keepalive-fast", fzNegotiated, fzKeepaliveFast, seq(newStreamFrame(1, "/f.F/H", rev1, 65536), newStreamFrame(2, "/f.F/B", rev1, 65536), requestFrames(2, nil), hc(2)), false},
		{"compressed", fzNegotiated, fzCompression, seq(
			newStreamFrame(1, "/f.F/U", rev1, 65536, "grpc-encoding", "gzip"), requestFrames(1, fzGzip([]byte("hello"))), hc(1),
			newStreamFrame(3, "/f.F/S", rev1, 65536, "grpc-encoding", "gzip"), requestFrames(3, []byte("not gzip")),
			newStreamFrame(5, "/f.F/U", rev1, 65536, "grpc-encoding", "zz"),
			newStreamFrame(7, "/f.F/S", rev1, 65536, "grpc-encoding", "identity"), requestFrames(7, []byte("plain")), hc(7),
		), false},
		{"compressed-bomb", fzNegotiated | fzTightLimits, fzCompression, seq(
			newStreamFrame(1, "/f.F/S", rev1, 65536, "grpc-encoding", "gzip"), requestFrames(1, fzGzip(make([]byte, 200_000))), hc(1),
		), false},
	}
}

func fzClientSeeds() []fzSeed {
	type S = *tunnelpb.ServerToClient
	seq := fzSeq[S]
	settings := serverSettingsFrame(-1, 65536, rev0, rev1)
	small := serverSettingsFrame(-1, 1000, rev0, rev1)
	ok := func(id int64) S { return closeCodeFrame(id, codes.OK, pbMetadata("t", "1")) }
	wd := serverWindowUpdateFrame
	return []fzSeed{
		{"unary", fzNegotiated, 0, seq(settings, headersFrame(1, pbMetadata("h", "1")), responseFrames(1, []byte("u")), ok(1)), true},
		{"chunked", fzNegotiated, 0, seq(settings, responseFrames(3, []byte(strings.Repeat("chunk", 200)), 300), responseFrames(3, []byte("x")), ok(3)), true},
		{"window-updates", fzNegotiated, 0, seq(small, wd(2, 3000), wd(2, 20000), responseFrames(2, []byte("s")), ok(2)), true},
		{"cancel", fzNegotiated, 0, seq(settings, responseFrames(4, []byte("first")), responseFrames(4, []byte("second")), ok(4)), true},
		{"protocol-violations", fzNegotiated, 0, seq(settings, responseFrames(1, []byte("u")), &tunnelpb.ServerToClient{StreamId: 1}, settings, wd(9, 1)), true},
		{"all-calls", fzNegotiated, fzSmallWindows, seq(small,
			responseFrames(1, []byte("u")), ok(1),
			wd(2, 25000), responseFrames(2, []byte("s")), responseFrames(2, make([]byte, 900)), ok(2),
			headersFrame(3, pbMetadata("h", "1")), responseFrames(3, make([]byte, 900)), responseFrames(3, make([]byte, 900)), ok(3),
			responseFrames(4, []byte("x")), ok(4),
		), false},
		{"window-overrun", fzNegotiated, fzSmallWindows, seq(settings, responseFrames(3, make([]byte, 700)), responseFrames(3, make([]byte, 700))), false},
		{"stream-violations", fzNegotiated, 0, seq(settings,
			responseFrame(1, 2, []byte("xyz")), responseFrame(2, 1<<32-1, []byte("x")), wd(3, 0x7FFFFFFF), wd(3, 0x7FFFFFFF),
			headersFrame(4, pbMetadata("a", "1")), headersFrame(4, pbMetadata("a", "2")), moreResponseFrame(4, []byte("x")),
		), false},
		{"revision-zero", 0, fzSmallWindows, seq(responseFrames(1, []byte("u")), ok(1), responseFrames(2, make([]byte, 1500)), responseFrames(2, make([]byte, 1500)), ok(2)), false},
		{"binary-metadata", fzNegotiated | fzBinaryMD, 0, seq(settings, headersFrame(1, pbMetadata("x-bin", "AP8")), responseFrames(1, nil), closeCodeFrame(1, codes.OK, pbMetadata("y-bin", "!!")), headersFrame(3, pbMetadata("z-bin", "!!"))), false},
		{"no-common-revision", fzNegotiated, 0, seq(serverSettingsFrame(-1, 65536, 7)), false},
		{"forward-tunnel-close", fzNegotiated | fzTunnelClose, 0, seq(settings, responseFrames(4, nil), closeCodeFrame(-1, codes.OK, nil)), false},
		{"reverse-drain", fzNegotiated | fzReverse | fzTunnelClose | fzDrain, 0, seq(settings, responseFrames(1, nil), ok(1)), false},
		{"tight-limits-broken-end", fzNegotiated | fzTightLimits | fzBrokenEnd, 0, seq(settings, responseFrame(2, 200_000, nil), headersFrame(1, pbMetadata("big", strings.Repeat("m", 1100)))), false},
		{"keepalive", fzNegotiated, fzKeepalive, seq(settings, wd(-1, pingBit|1), wd(-1, 1), responseFrames(1, nil), ok(1)), false},
		{"keepalive-fast", fzNegotiated, fzKeepaliveFast, seq(settings, headersFrame(4, pbMetadata("a", "1")), responseFrames(3, make([]byte, 300))), false},
		{"status-details", fzNegotiated, 0, seq(settings, closeFrame(1, status.New(codes.Code(99), "odd"), nil), closeCodeFrame(2, codes.Unavailable, nil)), false},
		{"compressed", fzNegotiated, fzCompression, seq(settings,
			headersFrame(1, pbMetadata("grpc-encoding", "gzip")), responseFrames(1, fzGzip([]byte("u"))), ok(1),
			headersFrame(2, pbMetadata("grpc-encoding", "nope")),
			headersFrame(3, pbMetadata("grpc-encoding", "gzip")), responseFrames(3, []byte("not gzip")),
		), false},
	}
}

func FuzzTunnelServer(f *testing.F) {
	for _, s := range fzServerSeeds() {
		if !s.onDisk {
			f.Add(s.bytes())
		}
	}
	f.Fuzz(fzRunServer)
}

func FuzzTunnelClient(f *testing.F) {
	for _, s := range fzClientSeeds() {
		if !s.onDisk {
			f.Add(s.bytes())
		}
	}
	f.Fuzz(fzRunClient)
}

// fzGzip compresses b as a peer using the compression extension would.
func fzGzip(b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	_, _ = w.Write(b)
	_ = w.Close()
	return buf.Bytes()
}

// fzSeedFile is a seed in the corpus file format of go test -fuzz.
func fzSeedFile(data []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", data)
}

// TestFzSeedFiles checks that the seeds committed under testdata/fuzz are
// the ones fzServerSeeds and fzClientSeeds describe; with
// GRPCTUNNEL_WRITE_FUZZ_SEEDS=1 it writes them instead. Files the fuzzer
// adds there (inputs that once failed) are left alone.
func TestFzSeedFiles(t *testing.T) {
	write := os.Getenv("GRPCTUNNEL_WRITE_FUZZ_SEEDS") == "1"
	for target, seeds := range map[string][]fzSeed{
		"FuzzTunnelServer": fzServerSeeds(),
		"FuzzTunnelClient": fzClientSeeds(),
	} {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, s := range seeds {
			if !s.onDisk {
				continue
			}
			path := filepath.Join(dir, "seed-"+s.name)
			want := fzSeedFile(s.bytes())
			if write {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, want, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (regenerate with GRPCTUNNEL_WRITE_FUZZ_SEEDS=1)", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s is stale (regenerate with GRPCTUNNEL_WRITE_FUZZ_SEEDS=1)", path)
			}
		}
	}
}
