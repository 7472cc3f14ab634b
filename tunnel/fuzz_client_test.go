package tunnel

// FuzzTunnelClient: a tunnel client, with calls in progress, fed the frames
// of a tunnel server over an in-memory outer stream; the input format, the
// checks and the harness it shares with FuzzTunnelServer are in
// fuzz_test.go.

import (
	"context"
	"fmt"
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

func (f *fzClientFrames) RecvMsg(m any) error {
	fr, err := f.Recv()
	if err != nil {
		return err
	}
	return receiveEncoded(m, fr)
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

func (f *fzClientFrames) SendMsg(m any) error {
	fr := new(tunnelpb.ClientToServer)
	if err := sentDecoded(m, fr); err != nil {
		f.mu.Lock()
		f.problem("unencodable frame %v: %v", m, err)
		f.mu.Unlock()
		return err
	}
	return f.Send(fr)
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

func FuzzTunnelClient(f *testing.F) {
	for _, s := range fzClientSeeds() {
		if !s.onDisk {
			f.Add(s.bytes())
		}
	}
	f.Fuzz(fzRunClient)
}
