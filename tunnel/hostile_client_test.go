package tunnel

// Hostile network servers against a NewChannel tunnel client, played with
// fakeNet; see hostile_test.go.

import (
	"context"
	"errors"
	"io"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// TestHostileClientStreamRules plays a network server that breaks the rules
// of one call toward a NewChannel client: the caller gets the status of the
// Errors table, a cancel reaches the server where the call ended on the
// client's side, and the tunnel carries on.
func TestHostileClientStreamRules(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "binary-metadata")
	whole := mustMarshal(t, bytesValue([]byte("response")))
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ServerToClient
		code   codes.Code
		cancel bool // the client tells the server the call is over
	}{
		{"chunk overruns its declared size", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("xyz"))}
		}, codes.Internal, true},
		{"continuation overruns the declared size", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("x")), moreResponseFrame(id, []byte("yz"))}
		}, codes.Internal, true},
		{"data with no message started", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{moreResponseFrame(id, []byte("x"))}
		}, codes.Internal, true},
		{"message started before the previous ended", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 2, []byte("x")), responseFrame(id, 2, []byte("x"))}
		}, codes.Internal, true},
		{"4 GiB message", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 0xFFFFFFFF, []byte("x"))}
		}, codes.ResourceExhausted, true},
		{"message over the size limit", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, 4<<20+1, nil)}
		}, codes.ResourceExhausted, true},
		// Two updates of 2^31-1: the window starts at 64 KiB, so the
		// first already overflows.
		{"window update overflows", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverWindowUpdateFrame(id, 0x7FFFFFFF), serverWindowUpdateFrame(id, 0x7FFFFFFF)}
		}, codes.Internal, true},
		{"headers twice", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{headersFrame(id, pbMetadata("a", "1")), headersFrame(id, pbMetadata("a", "2"))}
		}, codes.Internal, true},
		{"headers after a message", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, uint32(len(whole)), whole), headersFrame(id, pbMetadata("a", "1"))}
		}, codes.Internal, true},
		{"malformed binary headers", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{headersFrame(id, pbMetadata("x-bin", "!!not base64"))}
		}, codes.InvalidArgument, true},
		{"malformed binary trailers", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, uint32(len(whole)), whole), closeCodeFrame(id, codes.OK, pbMetadata("x-bin", "!!not base64"))}
		}, codes.InvalidArgument, true},
		// The client has nothing to cancel: the server ended the call.
		{"unary call closed without a response", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{closeCodeFrame(id, codes.OK, nil)}
		}, codes.Internal, false},
		{"two responses to a unary call", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(id, uint32(len(whole)), whole), responseFrame(id, uint32(len(whole)), whole)}
		}, codes.Internal, true},
		// Frames for a call that has ended race with its end: ignored.
		{"frames after the close are ignored", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{
				responseFrame(id, uint32(len(whole)), whole), closeCodeFrame(id, codes.OK, nil),
				responseFrame(id, 1, []byte("x")), moreResponseFrame(id, []byte("y")), serverWindowUpdateFrame(id, 0x7FFFFFFF), headersFrame(id, pbMetadata()), closeCodeFrame(id, codes.Internal, nil),
			}
		}, codes.OK, false},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			errc := backgroundUnary(peerContext(t), ch, []byte("request"))
			id, _ := c.readUnary(t)
			c.sendFwd(t, k.frames(id)...)
			wantCode(t, recvWithin(t, errc, "the call to end"), k.code)
			if k.cancel {
				if f := c.recvFwd(t); f.GetStreamId() != id || f.GetCancel() == nil {
					t.Fatalf("expected a cancel for stream %d, got %v", id, f)
				}
			}
			// readUnary fails on any stray frame, a cancel among them.
			fakeEcho(t, ch, c)
		})
	}
	// A caller blocked for want of window is released by the end of its
	// call. (Two window updates of 2^31-1 would not do here: with no
	// credit left, the first is legal and lets the caller finish.)
	t.Run("a stream error releases a caller waiting for window", func(t *testing.T) {
		cs, err := ch.NewStream(peerContext(t), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		sent := make(chan error, 1)
		go func() { sent <- cs.SendMsg(bytesValue(make([]byte, 200_000))) }()
		f := c.recvFwd(t)
		id := f.GetStreamId()
		if f.GetNewStream() == nil {
			t.Fatalf("expected a new_stream, got %v", f)
		}
		// Read until the caller has used up its window of 64 KiB: it is
		// then blocked waiting for more.
		for got := 0; got < 65536; {
			f := c.recvFwd(t)
			got += len(f.GetRequestMessage().GetData()) + len(f.GetMoreRequestData())
		}
		c.sendFwd(t, responseFrame(id, 2, []byte("xyz")))
		if err := recvWithin(t, sent, "the blocked SendMsg to return"); !errors.Is(err, io.EOF) {
			t.Fatalf("SendMsg returned %v; want io.EOF, the status coming from RecvMsg", err)
		}
		wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Internal)
		if f := c.recvFwd(t); f.GetStreamId() != id || f.GetCancel() == nil {
			t.Fatalf("expected a cancel for stream %d, got %v", id, f)
		}
		fakeEcho(t, ch, c)
	})
}

// TestHostileClientTunnelRules plays a network server that breaks rules of
// the tunnel toward a NewChannel client: the tunnel ends with Internal
// ("protocol error"), the call in progress fails with Unavailable, and a
// bystander tunnel to the same server carries on.
func TestHostileClientTunnelRules(t *testing.T) {
	n := startFakeNet(t)
	bystander, bc := n.openChannel(t, n.stub, true, "")
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ServerToClient
	}{
		{"settings again", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverSettingsFrame(-1, 65536, rev1)}
		}},
		{"settings on a stream", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverSettingsFrame(id, 65536, rev1)}
		}},
		{"frame of no known type", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{{StreamId: id}}
		}},
		{"frame for stream 0", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{serverWindowUpdateFrame(0, 1)}
		}},
		{"frame for a negative stream", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{responseFrame(-7, 1, []byte("x"))}
		}},
		{"close_stream on stream -1 without tunnel-close", func(int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{closeCodeFrame(-1, codes.OK, nil)}
		}},
		{"frame for the next stream, not opened yet", func(id int64) []*tunnelpb.ServerToClient {
			return []*tunnelpb.ServerToClient{headersFrame(id+1, nil)}
		}},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			ch, c := n.openChannel(t, n.stub, true, "")
			errc := backgroundUnary(peerContext(t), ch, []byte("request"))
			id, _ := c.readUnary(t)
			c.sendFwd(t, k.frames(id)...)
			wantCode(t, recvWithin(t, errc, "the call to end"), codes.Unavailable)
			recvWithin(t, ch.Done(), "the tunnel to end")
			if err := ch.Err(); status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "protocol error") {
				t.Fatalf("tunnel ended with %v; want Internal protocol error", err)
			}
			_, err := unary(peerContext(t), ch, nil)
			wantCode(t, err, codes.Unavailable)
			fakeEcho(t, bystander, bc)
		})
	}
	t.Run("settings with no revision in common", func(t *testing.T) {
		res := make(chan error, 1)
		ctx := peerContext(t)
		go func() {
			_, err := NewChannel(n.stub).Start(ctx)
			res <- err
		}()
		c := recvWithin(t, n.fwd, "the tunnel-opening RPC")
		if err := c.fwd.SendHeader(fakeOpening(true, "")); err != nil {
			t.Fatal(err)
		}
		c.sendFwd(t, serverSettingsFrame(-1, 65536, 7, 9))
		err := recvWithin(t, res, "Start to fail")
		wantCode(t, err, codes.Unavailable)
		if !strings.Contains(err.Error(), "revision") {
			t.Fatalf("unclear error: %v", err)
		}
		fakeEcho(t, bystander, bc)
	})
}

// TestHostileClientStreamsNeverFinish plays a network server that takes
// calls and never answers: calls beyond WithMaxConcurrentStreams fail at once
// with ResourceExhausted, and when the server ends the tunnel every call in
// progress ends with Unavailable.
func TestHostileClientStreamsNeverFinish(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "", WithMaxConcurrentStreams(2))
	ctx := peerContext(t)
	first := backgroundUnary(ctx, ch, []byte("one"))
	c.readUnary(t)
	second := backgroundUnary(ctx, ch, []byte("two"))
	c.readUnary(t)
	_, err := unary(ctx, ch, []byte("three"))
	wantCode(t, err, codes.ResourceExhausted)
	c.end <- nil
	wantCode(t, recvWithin(t, first, "the first call to end"), codes.Unavailable)
	wantCode(t, recvWithin(t, second, "the second call to end"), codes.Unavailable)
	recvWithin(t, ch.Done(), "the tunnel to end")
}

// hosCountingStub counts the message bytes that a tunnel client's outer
// stream has accepted.
type hosCountingStub struct {
	tunnelpb.TunnelServiceClient
	sent atomic.Int64
}

func (s *hosCountingStub) OpenTunnel(ctx context.Context, opts ...grpc.CallOption) (tunnelpb.TunnelService_OpenTunnelClient, error) {
	st, err := s.TunnelServiceClient.OpenTunnel(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return &hosCountingStream{TunnelService_OpenTunnelClient: st, stub: s}, nil
}

type hosCountingStream struct {
	tunnelpb.TunnelService_OpenTunnelClient
	stub *hosCountingStub
}

func (s *hosCountingStream) SendMsg(m any) error {
	err := s.TunnelService_OpenTunnelClient.SendMsg(m)
	if err == nil {
		s.stub.sent.Add(int64(framePayload(m)))
	}
	return err
}

// hosSendMessages sends count messages of size bytes on cs and reports on
// done how many went out and why it stopped.
func hosSendMessages(cs grpc.ClientStream, count, size int, done chan<- error, completed *atomic.Int64) {
	m := bytesValue(make([]byte, size))
	for range count {
		if err := cs.SendMsg(m); err != nil {
			done <- err
			return
		}
		completed.Add(1)
	}
	done <- nil
}

// hosParkedInSend reports whether a goroutine running hosSendMessages is
// blocked (not running, not runnable) inside the outer stream's Send.
func hosParkedInSend() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		header, _, _ := strings.Cut(g, "\n")
		if strings.Contains(g, "tunnel.hosSendMessages") && strings.Contains(g, "(*hosCountingStream).Send") &&
			!strings.Contains(header, "[running") && !strings.Contains(header, "[runnable") {
			return true
		}
	}
	return false
}

// TestHostileClientPeerNeverReads plays a forward tunnel's network server
// that stops reading after the first frame of a call while the caller sends
// much more than the peer could ever take. Under revision one the caller
// stops at the window; under revision zero at gRPC's own flow control. Either
// way what got through and what the process holds stay bounded, and the
// caller is released when its call or the tunnel ends.
func TestHostileClientPeerNeverReads(t *testing.T) {
	t.Run("revision one", func(t *testing.T) {
		n := startFakeNet(t)
		stub := &hosCountingStub{TunnelServiceClient: n.stub}
		ch, c := n.openChannel(t, stub, true, "")
		bystander, bc := n.openChannel(t, n.stub, true, "")
		ctx, cancel := context.WithCancel(peerContext(t))
		cs, err := ch.NewStream(ctx, probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		if f := c.recvFwd(t); f.GetNewStream() == nil { // the last frame read
			t.Fatalf("expected a new_stream, got %v", f)
		}
		done := make(chan error, 1)
		var completed atomic.Int64
		go hosSendMessages(cs, 64, 1<<20, done, &completed)
		st := cs.(*clientStream)
		waitFor(t, func() bool { return st.window.Available() == 0 && stub.sent.Load() == 65536 })
		// The caller took all the credit there was and waits for more:
		// not one of its 1 MiB messages is complete.
		if n := completed.Load(); n != 0 {
			t.Fatalf("%d messages of 1 MiB sent against a window of 64 KiB", n)
		}
		cancel()
		if err := recvWithin(t, done, "the blocked SendMsg to return"); !errors.Is(err, io.EOF) {
			t.Fatalf("SendMsg returned %v; want io.EOF", err)
		}
		wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Canceled)
		if got := stub.sent.Load(); got != 65536 {
			t.Fatalf("%d bytes reached the outer stream against a window of 64 KiB", got)
		}
		fakeEcho(t, bystander, bc)
	})
	t.Run("revision zero", func(t *testing.T) {
		n := startFakeNet(t)
		stub := &hosCountingStub{TunnelServiceClient: n.stub}
		ch, c := n.openChannel(t, stub, false, "")
		bystander, bc := n.openChannel(t, n.stub, false, "")
		var before runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		cs, err := ch.NewStream(peerContext(t), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		if f := c.recvFwd(t); f.GetNewStream() == nil { // the last frame read
			t.Fatalf("expected a new_stream, got %v", f)
		}
		const count, size = 256, 1 << 20
		done := make(chan error, 1)
		var completed atomic.Int64
		go hosSendMessages(cs, count, size, done, &completed)
		// Without windows, nothing but the outer stream's flow control
		// holds the caller back; it must, well before 256 MiB.
		waitFor(t, func() bool {
			select {
			case err := <-done:
				t.Fatalf("all %d MiB were taken with nobody reading (%v)", count, err)
			default:
			}
			return hosParkedInSend()
		})
		var after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&after)
		grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
		t.Logf("caller blocked after %d messages, %d bytes through, heap grown by %d bytes", completed.Load(), stub.sent.Load(), grown)
		if got := stub.sent.Load(); got > 64<<20 {
			t.Fatalf("%d bytes went into the outer stream with nobody reading", got)
		}
		if grown > 96<<20 {
			t.Fatalf("heap grew by %d bytes with nobody reading", grown)
		}
		// A stalled outer stream stalls the whole revision-zero tunnel;
		// ending the tunnel releases the caller.
		ch.Close()
		if err := recvWithin(t, done, "the blocked SendMsg to return"); err == nil {
			t.Fatal("SendMsg succeeded on a closed tunnel")
		}
		fakeEcho(t, bystander, bc)
	})
}

// TestHostileClientAbandonedMessages plays a network server that answers a
// server-streaming call with several responses and the end of the call, all
// at once, to a caller that reads no further after the first: its RecvMsg
// fails on a response it cannot decode, or it cancels the call. What it left
// unread must not stay charged to the tunnel's buffer budget
// (WithMaxBufferedBytes), or a peer that repeats this exhausts the budget and
// every call on the tunnel fails for want of it.
func TestHostileClientAbandonedMessages(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "")
	tc := ch.(*tunnelClient)
	first := mustMarshal(t, bytesValue([]byte("first")))
	more := mustMarshal(t, bytesValue(make([]byte, 1000)))
	for _, k := range []struct {
		name  string
		first []byte
		give  func(t *testing.T, cs grpc.ClientStream, cancel context.CancelFunc)
	}{
		{"undecodable response", []byte{0xff}, func(t *testing.T, cs grpc.ClientStream, _ context.CancelFunc) {
			wantCode(t, cs.RecvMsg(new(wrapperspb.BytesValue)), codes.Internal)
		}},
		{"caller cancels", first, func(t *testing.T, cs grpc.ClientStream, cancel context.CancelFunc) {
			m := new(wrapperspb.BytesValue)
			if err := cs.RecvMsg(m); err != nil || string(m.GetValue()) != "first" {
				t.Fatalf("first response: %q, %v", m.GetValue(), err)
			}
			cancel()
		}},
	} {
		t.Run(k.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(peerContext(t))
			defer cancel()
			cs, err := ch.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, probeStream)
			if err != nil {
				t.Fatal(err)
			}
			if err := cs.SendMsg(bytesValue([]byte("go"))); err != nil {
				t.Fatal(err)
			}
			id, _ := c.readUnary(t)
			c.sendFwd(t,
				responseFrame(id, uint32(len(k.first)), k.first),
				responseFrame(id, uint32(len(more)), more),
				responseFrame(id, uint32(len(more)), more),
				closeCodeFrame(id, codes.OK, nil))
			// The reader has taken every frame once the call has ended.
			recvWithin(t, cs.(*clientStream).ended, "the end of the call")
			k.give(t, cs, cancel)
			if used := tc.buffered.used.Load(); used != 0 {
				t.Fatalf("%d bytes the caller will never read stay charged to the tunnel's budget", used)
			}
			fakeEcho(t, ch, c)
		})
	}
}

// TestHostileClientPeerPingsNeverReads plays a forward tunnel's network
// server that floods a NewChannel client with keepalive pings and never reads
// the pongs, which the client's reader queues: what the client holds for
// that peer stays bounded, and past the bound the tunnel ends with
// ResourceExhausted.
func TestHostileClientPeerPingsNeverReads(t *testing.T) {
	n := startFakeNet(t)
	ch, c := n.openChannel(t, n.stub, true, "keepalive")
	bystander, bc := n.openChannel(t, n.stub, true, "keepalive")
	sent := hosFlood(60000, func(int) error { return c.fwd.Send(serverWindowUpdateFrame(-1, pingBit|1)) })
	t.Cleanup(func() {
		ch.Close() // ends the flood, if it is still going
		<-sent
	})
	tc := ch.(*tunnelClient)
	hosWatchQueue(t, func() int { return hosQueued(tc.out) }, tc.done)
	wantCode(t, ch.Err(), codes.ResourceExhausted)
	_, err := unary(peerContext(t), ch, nil)
	wantCode(t, err, codes.Unavailable)
	fakeEcho(t, bystander, bc)
}
