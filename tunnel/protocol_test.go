package tunnel

import (
	"context"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// These tests speak grpctunnel.v1 frame by frame, as a peer that knows only
// the published protocol would, to pin down the wire behaviour of each end.

func TestProtocolNegotiation(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	t.Run("revision one", func(t *testing.T) {
		r := openRaw(t, ts.stub, true)
		if got := r.header.Get("grpctunnel-negotiate"); len(got) != 1 || got[0] != "on" {
			t.Fatalf("negotiate response header %v", got)
		}
		f := r.recv()
		s := f.GetSettings()
		if s == nil || f.GetStreamId() != -1 {
			t.Fatalf("first frame is not settings on stream -1: %v", f)
		}
		if s.GetInitialWindowSize() != 65536 {
			t.Fatalf("initial window %d", s.GetInitialWindowSize())
		}
		found := false
		for _, rev := range s.GetSupportedProtocolRevisions() {
			found = found || rev == tunnelpb.ProtocolRevision_REVISION_ONE
		}
		if !found {
			t.Fatalf("revision one not offered: %v", s)
		}
		req := mustMarshal(t, bytesValue([]byte("hi")))
		r.send(newStreamFrame(1, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, 65536))
		r.sendMessage(1, req)
		r.send(halfCloseFrame(1))
		msgs, st := r.readResponse(1, false)
		if st.Code() != codes.OK || len(msgs) != 1 || string(msgs[0]) != string(req) {
			t.Fatalf("response %q, %v", msgs, st)
		}
	})
	t.Run("revision zero", func(t *testing.T) {
		// Without the client's header there are no settings: the first
		// frame is the first call's response.
		r := openRaw(t, ts.stub, false)
		req := mustMarshal(t, bytesValue([]byte("hi")))
		r.send(newStreamFrame(1, "grpctunnel.test.Probe/Unary", tunnelpb.ProtocolRevision_REVISION_ZERO, 0))
		r.sendMessage(1, req)
		r.send(halfCloseFrame(1))
		msgs, st := r.readResponse(1, false)
		if st.Code() != codes.OK || len(msgs) != 1 || string(msgs[0]) != string(req) {
			t.Fatalf("response %q, %v", msgs, st)
		}
		// A revision-one stream on a revision-zero tunnel is refused.
		r.send(newStreamFrame(2, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, 65536))
		if _, st := r.readResponse(2, false); st.Code() != codes.Unimplemented {
			t.Fatalf("status %v", st)
		}
	})
	t.Run("flow control disabled on the server", func(t *testing.T) {
		ts := startServer(t, TunnelServiceHandlerOptions{DisableFlowControl: true}, testServices(echoProbe()))
		r := openRaw(t, ts.stub, true)
		if got := r.header.Get("grpctunnel-negotiate"); len(got) != 0 {
			t.Fatalf("server with flow control disabled negotiated: %v", got)
		}
		r.send(newStreamFrame(1, probeUnary, tunnelpb.ProtocolRevision_REVISION_ZERO, 0))
		r.sendMessage(1, mustMarshal(t, bytesValue(nil)))
		r.send(halfCloseFrame(1))
		if _, st := r.readResponse(1, false); st.Code() != codes.OK {
			t.Fatalf("status %v", st)
		}
	})
}

// TestProtocolServerRespectsWindow gives the server a small window and
// checks it sends no more than granted, in chunks of at most 16 KiB.
func TestProtocolServerRespectsWindow(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	r := openRaw(t, ts.stub, true)
	r.recv() // settings
	const window = 20000
	req := mustMarshal(t, bytesValue(make([]byte, 100000)))
	r.send(newStreamFrame(1, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, window))
	r.sendMessage(1, req)
	r.send(halfCloseFrame(1))

	received := 0
	for received < window {
		f := r.recv()
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ServerToClient_ResponseMessage:
			received += len(fr.ResponseMessage.GetData())
		case *tunnelpb.ServerToClient_MoreResponseData:
			received += len(fr.MoreResponseData)
		case *tunnelpb.ServerToClient_WindowUpdate, *tunnelpb.ServerToClient_ResponseHeaders:
		default:
			t.Fatalf("unexpected frame %v", f)
		}
	}
	if received != window {
		t.Fatalf("server sent %d bytes against a window of %d", received, window)
	}
	// Grant the rest chunk by chunk; the message must complete.
	r.send(windowUpdateFrame(1, window))
	for {
		f := r.recv()
		var n int
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ServerToClient_MoreResponseData:
			n = len(fr.MoreResponseData)
		case *tunnelpb.ServerToClient_WindowUpdate:
			continue
		case *tunnelpb.ServerToClient_CloseStream:
			if received != len(req) || fr.CloseStream.GetStatus().GetCode() != 0 {
				t.Fatalf("closed after %d of %d bytes: %v", received, len(req), fr.CloseStream)
			}
			return
		default:
			t.Fatalf("unexpected frame %v", f)
		}
		if n > 16384 {
			t.Fatalf("chunk of %d bytes", n)
		}
		received += n
		r.send(windowUpdateFrame(1, uint32(n)))
	}
}

// TestProtocolMaxChunkExtension announces larger chunks and checks that the
// server uses them, and that without the announcement it never does.
func TestProtocolMaxChunkExtension(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	for _, c := range []struct {
		name    string
		headers []string
		want    int
	}{
		{"announced", []string{"grpctunnel-extensions", "max-chunk=1048576"}, 65536},
		{"not announced", nil, 16384},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := openRaw(t, ts.stub, true, c.headers...)
			if c.headers != nil {
				if v, ok := extensionValue(r.header, "max-chunk"); !ok || v != "262144" {
					t.Fatalf("server announced max-chunk %q", v)
				}
			}
			r.recv() // settings
			req := mustMarshal(t, bytesValue(make([]byte, 200000)))
			r.send(newStreamFrame(1, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, 65536))
			r.sendMessage(1, req)
			r.send(halfCloseFrame(1))
			for {
				f := r.recv()
				if m := f.GetResponseMessage(); m != nil {
					// The first chunk is as large as both the window and
					// the agreed chunk size allow.
					if got := len(m.GetData()); got != c.want {
						t.Fatalf("first chunk %d bytes; want %d", got, c.want)
					}
					return
				}
			}
		})
	}
}

// TestProtocolTunnelCloseExtension drains a server whose client announced
// tunnel-close: the server asks for the end with a close_stream on stream -1
// and ends cleanly once the client half-closes.
func TestProtocolTunnelCloseExtension(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	r := openRaw(t, ts.stub, true, "grpctunnel-extensions", "tunnel-close")
	if !hasValue(r.header, "grpctunnel-extensions", "tunnel-close") {
		t.Fatalf("server did not announce tunnel-close: %v", r.header)
	}
	r.recv() // settings
	ts.handler.InitiateShutdown()
	f := r.recv()
	if f.GetStreamId() != -1 || f.GetCloseStream() == nil || f.GetCloseStream().GetStatus().GetCode() != 0 {
		t.Fatalf("expected a close request on stream -1, got %v", f)
	}
	if err := r.stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.stream.Recv(); err != io.EOF {
		t.Fatalf("tunnel ended with %v; want a clean end", err)
	}
}

func TestProtocolWindowOverrun(t *testing.T) {
	blocked := &probe{stream: func(ss grpc.ServerStream) error {
		<-ss.Context().Done() // never reads
		return nil
	}}
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(blocked))
	r := openRaw(t, ts.stub, true)
	r.recv() // settings
	r.send(newStreamFrame(1, probeStream, tunnelpb.ProtocolRevision_REVISION_ONE, 65536))
	r.sendMessage(1, make([]byte, 40000))
	r.sendMessage(1, make([]byte, 40000)) // 80000 bytes against 65536
	if _, st := r.readResponse(1, false); st.Code() != codes.ResourceExhausted {
		t.Fatalf("overrun closed the stream with %v; want ResourceExhausted", st)
	}
	// The tunnel itself is fine.
	r.send(newStreamFrame(2, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, 65536))
	r.sendMessage(2, nil)
	r.send(halfCloseFrame(2))
	if _, st := r.readResponse(2, false); st.Code() != codes.OK {
		t.Fatalf("next call on the tunnel: %v", st)
	}
}

// TestProtocolStreamErrors sends frames that break the rules of one stream:
// each closes that stream with a clear status and the tunnel carries on.
func TestProtocolStreamErrors(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	r := openRaw(t, ts.stub, true)
	r.recv() // settings
	id := int64(0)
	cases := []struct {
		name   string
		frames func(id int64) []*tunnelpb.ClientToServer
		code   codes.Code
	}{
		{"malformed method", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "nomethod", rev1, 65536)}
		}, codes.Unimplemented},
		{"empty method", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "", rev1, 65536)}
		}, codes.Unimplemented},
		{"unknown service", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, "/no.Such/Method", rev1, 65536)}
		}, codes.Unimplemented},
		{"unknown revision", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, 7, 65536)}
		}, codes.Unimplemented},
		{"data before a message", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, rev1, 65536), moreFrame(id, []byte("x"))}
		}, codes.Internal},
		{"chunk overruns size", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, rev1, 65536), messageFrame(id, 2, []byte("xyz"))}
		}, codes.Internal},
		{"continuation overruns size", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, rev1, 65536), messageFrame(id, 2, []byte("x")), moreFrame(id, []byte("yz"))}
		}, codes.Internal},
		{"message started twice", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, rev1, 65536), messageFrame(id, 2, []byte("x")), messageFrame(id, 2, []byte("x"))}
		}, codes.Internal},
		{"4 GiB message", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, rev1, 65536), messageFrame(id, 1<<32-1, []byte("x"))}
		}, codes.ResourceExhausted},
		{"no request for a unary method", func(id int64) []*tunnelpb.ClientToServer {
			return []*tunnelpb.ClientToServer{newStreamFrame(id, probeUnary, rev1, 65536), halfCloseFrame(id)}
		}, codes.Internal},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id++
			for _, f := range c.frames(id) {
				r.send(f)
			}
			if _, st := r.readResponse(id, false); st.Code() != c.code {
				t.Fatalf("status %v; want %v", st, c.code)
			}
			// Frames for a stream that has ended are ignored.
			r.send(halfCloseFrame(id))
		})
	}
	id++
	r.send(newStreamFrame(id, probeUnary, rev1, 65536))
	r.sendMessage(id, mustMarshal(t, bytesValue([]byte("still here"))))
	r.send(halfCloseFrame(id))
	if _, st := r.readResponse(id, false); st.Code() != codes.OK {
		t.Fatalf("tunnel after stream errors: %v", st)
	}
}

// TestProtocolViolationsEndTheTunnel breaks rules of the tunnel itself: the
// tunnel ends with a clear status, and other tunnels are untouched.
func TestProtocolViolationsEndTheTunnel(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	bystander := forward(t, ts.stub)
	cases := []struct {
		name   string
		frames []*tunnelpb.ClientToServer
	}{
		{"frame for a stream never opened", []*tunnelpb.ClientToServer{moreFrame(5, []byte("x"))}},
		{"stream ID reused", []*tunnelpb.ClientToServer{newStreamFrame(3, probeStream, rev1, 65536), newStreamFrame(3, probeStream, rev1, 65536)}},
		{"stream ID goes down", []*tunnelpb.ClientToServer{newStreamFrame(3, probeStream, rev1, 65536), newStreamFrame(2, probeStream, rev1, 65536)}},
		{"negative stream ID", []*tunnelpb.ClientToServer{newStreamFrame(-4, probeStream, rev1, 65536)}},
		{"frame of no known type", []*tunnelpb.ClientToServer{{StreamId: 1}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := openRaw(t, ts.stub, true)
			r.recv() // settings
			for _, f := range c.frames {
				_ = r.stream.Send(f)
			}
			for {
				_, err := r.stream.Recv()
				if err == nil {
					continue // close_stream of a refused stream, say
				}
				if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "protocol error") {
					t.Fatalf("tunnel ended with %v; want Internal protocol error", err)
				}
				break
			}
			if _, err := unary(context.Background(), bystander, []byte("ok")); err != nil {
				t.Fatalf("another tunnel was harmed: %v", err)
			}
		})
	}
}

// TestProtocolReverseTunnelServer plays a plain network server that calls a
// ReverseTunnelServer frame by frame.
func TestProtocolReverseTunnelServer(t *testing.T) {
	result := make(chan error, 1)
	stub := startFake(t, &fakeNetworkServer{reverse: func(s tunnelpb.TunnelService_OpenReverseTunnelServer) error {
		result <- func() error {
			md, _ := metadata.FromIncomingContext(s.Context())
			if got := md.Get("grpctunnel-negotiate"); len(got) != 1 || got[0] != "on" {
				return status.Errorf(codes.FailedPrecondition, "client did not offer negotiation: %v", got)
			}
			if err := s.SendHeader(metadata.Pairs("grpctunnel-negotiate", "on")); err != nil {
				return err
			}
			f, err := s.Recv()
			if err != nil {
				return err
			}
			if f.GetSettings() == nil || f.GetStreamId() != -1 {
				return status.Errorf(codes.FailedPrecondition, "first frame is not settings: %v", f)
			}
			req := mustMarshal(t, bytesValue([]byte("ping")))
			for _, out := range []*tunnelpb.ClientToServer{
				newStreamFrame(1, probeUnary, tunnelpb.ProtocolRevision_REVISION_ONE, 65536),
				messageFrame(1, uint32(len(req)), req),
				halfCloseFrame(1),
			} {
				if err := s.Send(out); err != nil {
					return err
				}
			}
			var body []byte
			for {
				f, err := s.Recv()
				if err != nil {
					return err
				}
				switch fr := f.GetFrame().(type) {
				case *tunnelpb.ServerToClient_ResponseMessage:
					body = fr.ResponseMessage.GetData()
				case *tunnelpb.ServerToClient_CloseStream:
					if fr.CloseStream.GetStatus().GetCode() != 0 || string(body) != string(req) {
						return status.Errorf(codes.FailedPrecondition, "call ended with %v, body %q", fr.CloseStream, body)
					}
					return nil
				}
			}
		}()
		return nil
	}})
	rs := NewReverseTunnelServer(stub)
	rs.RegisterService(&probeDesc, echoProbe())
	started, err := rs.Serve(context.Background())
	if !started || err != nil {
		t.Fatalf("Serve = %v, %v", started, err)
	}
	if err := <-result; err != nil {
		t.Fatal(err)
	}
}

// TestProtocolClientViolations plays a plain network server that misbehaves
// toward this package's tunnel client.
func TestProtocolClientViolations(t *testing.T) {
	serve := func(script func(s tunnelpb.TunnelService_OpenTunnelServer) error) TunnelChannel {
		stub := startFake(t, &fakeNetworkServer{forward: func(s tunnelpb.TunnelService_OpenTunnelServer) error {
			if err := s.SendHeader(metadata.Pairs("grpctunnel-negotiate", "on")); err != nil {
				return err
			}
			return script(s)
		}})
		return forward(t, stub)
	}
	settings := serverSettingsFrame(-1, 65536, rev1)
	t.Run("frame for a stream never opened", func(t *testing.T) {
		ch := serve(func(s tunnelpb.TunnelService_OpenTunnelServer) error {
			_ = s.Send(settings)
			_ = s.Send(serverWindowUpdateFrame(9, 1))
			<-s.Context().Done()
			return nil
		})
		<-ch.Done()
		if err := ch.Err(); err == nil || !strings.Contains(err.Error(), "protocol error") {
			t.Fatalf("tunnel ended with %v", err)
		}
		_, err := unary(context.Background(), ch, nil)
		wantCode(t, err, codes.Unavailable)
	})
	t.Run("settings missing", func(t *testing.T) {
		stub := startFake(t, &fakeNetworkServer{forward: func(s tunnelpb.TunnelService_OpenTunnelServer) error {
			_ = s.SendHeader(metadata.Pairs("grpctunnel-negotiate", "on"))
			_ = s.Send(serverWindowUpdateFrame(1, 1))
			<-s.Context().Done()
			return nil
		}})
		_, err := NewChannel(stub).Start(context.Background())
		wantCode(t, err, codes.Unavailable)
		if !strings.Contains(err.Error(), "settings") {
			t.Fatalf("unclear error: %v", err)
		}
	})
	t.Run("server overruns the window", func(t *testing.T) {
		ch := serve(func(s tunnelpb.TunnelService_OpenTunnelServer) error {
			_ = s.Send(settings)
			f, err := s.Recv()
			if err != nil {
				return err
			}
			id := f.GetStreamId()
			window := f.GetNewStream().GetInitialWindowSize()
			// Two messages that together exceed the window.
			for range 2 {
				half := make([]byte, window/2+1)
				for _, f := range messageFrames(serverFramer(id), half, 16384) {
					_ = s.Send(f)
				}
			}
			<-s.Context().Done()
			return nil
		})
		cs, err := ch.NewStream(context.Background(), probeStreamDesc, probeStream)
		if err != nil {
			t.Fatal(err)
		}
		// Don't read: the first message stays queued, the second overruns.
		waitFor(t, func() bool {
			select {
			case <-cs.(*clientStream).ended:
				return true
			default:
				return false
			}
		})
		for {
			if err := cs.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
				wantCode(t, err, codes.ResourceExhausted)
				break
			}
		}
	})
}
