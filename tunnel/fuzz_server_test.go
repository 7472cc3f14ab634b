package tunnel

// FuzzTunnelServer: a tunnel server fed the frames of a tunnel client over
// an in-memory outer stream; the input format, the checks and the harness
// they share with FuzzTunnelClient are in fuzz_test.go.

import (
	"context"
	"errors"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

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

func (f *fzServerFrames) RecvMsg(m any) error {
	fr, err := f.Recv()
	if err != nil {
		return err
	}
	return receiveEncoded(m, fr)
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

func (f *fzServerFrames) SendMsg(m any) error {
	fr := new(tunnelpb.ServerToClient)
	if err := sentDecoded(m, fr); err != nil {
		f.mu.Lock()
		f.problem("unencodable frame %v: %v", m, err)
		f.mu.Unlock()
		return err
	}
	return f.Send(fr)
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

func FuzzTunnelServer(f *testing.F) {
	for _, s := range fzServerSeeds() {
		if !s.onDisk {
			f.Add(s.bytes())
		}
	}
	f.Fuzz(fzRunServer)
}
