package tunnel

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
)

// TestAdmitGivesATunnelBack plays the network server of a reverse tunnel
// that ReconnectOptions.Admit refuses: the tunnel sends its settings first
// and then the drain notice (with the drain extension) or the end of its
// side of the stream (without), serves the call the server had already
// sent, is reported as given back, never as open, and opens again; the
// next one, admitted, is reported open with the opening RPC's header and
// serves calls.
func TestAdmitGivesATunnelBack(t *testing.T) {
	for _, ext := range []string{"drain", ""} {
		t.Run("extensions="+ext, func(t *testing.T) {
			n := startFakeNet(t)
			rs := peerReverseServer(t, n.stub, echoProbe())
			errSame := errors.New("that server holds another tunnel already")
			admitted := make(chan StateChange, 4)
			changes := make(chan StateChange, 16)
			done := make(chan error, 1)
			go func() {
				done <- rs.ServeWithReconnect(peerContext(t), ReconnectOptions{
					MinBackoff: time.Millisecond,
					Admit: func(c StateChange) error {
						admitted <- c
						if c.Header.Get("x-server")[0] == "first" {
							return errSame
						}
						return nil
					},
					OnStateChange: func(c StateChange) { changes <- c },
				})
			}()
			// next returns the next change that is not an attempt starting.
			next := func() StateChange {
				t.Helper()
				for {
					if c := recvWithin(t, changes, "a state change"); c.State != TunnelConnecting {
						return c
					}
				}
			}
			open := func(name string) *fakeConn {
				t.Helper()
				c := recvWithin(t, n.rev, "the reverse tunnel-opening RPC")
				md := fakeOpening(true, ext)
				md.Set("x-server", name)
				if err := c.rev.SendHeader(md); err != nil {
					t.Fatal(err)
				}
				if f := c.recvRev(t); f.GetSettings() == nil || f.GetStreamId() != settingsStreamID {
					t.Fatalf("the first frame is not settings: %v", f)
				}
				return c
			}

			first := open("first")
			if c := recvWithin(t, admitted, "Admit"); c.State != TunnelOpen || c.Tunnel != 0 || c.GiveBack != nil {
				t.Fatalf("Admit was asked about %+v; want tunnel 0 open, without GiveBack", c)
			}
			if ext == "drain" {
				// A call the server starts before it learns of the drain:
				// it crosses the notice, and is served all the same.
				req := mustMarshal(t, bytesValue([]byte("crossing")))
				first.sendRev(t, newStreamFrame(1, probeUnary, rev1, 65536), messageFrame(1, uint32(len(req)), req), halfCloseFrame(1))
				if f := first.recvRev(t); f.GetStreamId() != settingsStreamID || f.GetResponseHeaders() == nil {
					t.Fatalf("the frame after the settings is not the drain notice: %v", f)
				}
				if body, st := first.closeOf(t, 1); st.Code() != codes.OK || string(body) != string(req) {
					t.Fatalf("the call that crossed the drain notice: %q, %v", body, st)
				}
				// The tunnel client ends a drained tunnel with no call left.
				first.end <- nil
			} else {
				// Without the extension the tunnel server ends its side
				// of the idle tunnel, and the server ends the rest.
				if f, err := first.rev.Recv(); err != io.EOF {
					t.Fatalf("after the settings: %v, %v; want the end of the stream", f, err)
				}
				first.end <- nil
			}
			c := next()
			if c.State != TunnelWaiting || !errors.Is(c.Err, ErrGivenBack) || !errors.Is(c.Err, errSame) || c.Delay > time.Millisecond {
				t.Fatalf("after Admit refused: %v, %v, delay %v; want waiting, given back for Admit's reason, within MinBackoff", c.State, c.Err, c.Delay)
			}

			second := open("second")
			if c := recvWithin(t, admitted, "Admit"); c.Header.Get("x-server")[0] != "second" {
				t.Fatalf("Admit was asked about the header %v", c.Header)
			}
			c = next()
			if c.State != TunnelOpen || c.Header.Get("x-server")[0] != "second" || c.GiveBack == nil {
				t.Fatalf("after Admit admitted: %+v; want open, with the header and GiveBack", c)
			}
			second.revEcho(t, 1)
			rs.Stop()
			if err := recvWithin(t, done, "ServeWithReconnect to return"); err != nil {
				t.Fatalf("ServeWithReconnect after Stop = %v; want nil", err)
			}
		})
	}
}

// TestGiveBackMovesAnOpenTunnel gives back a tunnel that carries a call:
// the server stops sending calls to it at once, the call finishes, and
// only then does the tunnel end and open again, reported as given back
// for the reason given, not as a failure or the server going away.
func TestGiveBackMovesAnOpenTunnel(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, nil)
	rs := NewReverseTunnelServer(ts.stub)
	testServices(echoProbe())(rs)
	reason := errors.New("another server is free")
	opened := make(chan StateChange, 4)
	given := make(chan StateChange, 4)
	done := make(chan error, 1)
	go func() {
		done <- rs.ServeWithReconnect(context.Background(), ReconnectOptions{
			MinBackoff: time.Millisecond,
			OnStateChange: func(c StateChange) {
				switch {
				case c.State == TunnelOpen:
					opened <- c
				case c.State == TunnelWaiting:
					given <- c
				}
			},
		})
	}()
	first := recvWithin(t, opened, "the tunnel to open")
	waitFor(t, func() bool { return len(ts.handler.AllReverseTunnels()) == 1 })
	old := ts.handler.AllReverseTunnels()[0]

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := old.NewStream(ctx, probeStreamDesc, probeStream)
	if err != nil {
		t.Fatal(err)
	}
	echo := func(s string) {
		t.Helper()
		if err := stream.SendMsg(bytesValue([]byte(s))); err != nil {
			t.Fatal(err)
		}
		m := bytesValue(nil)
		if err := stream.RecvMsg(m); err != nil || string(m.GetValue()) != s {
			t.Fatalf("echo of %q: %q, %v", s, m.GetValue(), err)
		}
	}
	echo("before")

	first.GiveBack(reason)
	first.GiveBack(errors.New("a second call changes nothing"))
	waitFor(t, func() bool { return old.Info().Draining })
	// The call in progress carries on, and holds the tunnel open.
	echo("while draining")
	if len(given) != 0 {
		t.Fatal("the tunnel ended with a call in progress")
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if err := stream.RecvMsg(bytesValue(nil)); err != io.EOF {
		t.Fatalf("the call's end: %v", err)
	}
	c := recvWithin(t, given, "the tunnel to end")
	if !errors.Is(c.Err, ErrGivenBack) || !errors.Is(c.Err, reason) || c.Delay > time.Millisecond {
		t.Fatalf("after GiveBack: %v, delay %v; want given back for the first reason, within MinBackoff", c.Err, c.Delay)
	}
	recvWithin(t, opened, "the tunnel to open again")
	waitFor(t, func() bool {
		now := ts.handler.AllReverseTunnels()
		return len(now) == 1 && now[0] != old
	})
	if _, err := unary(ctx, ts.handler.AsChannel(), []byte("x")); err != nil {
		t.Fatal(err)
	}
	rs.Stop()
	if err := <-done; err != nil {
		t.Fatalf("ServeWithReconnect after Stop = %v; want nil", err)
	}
	first.GiveBack(reason) // long over: nothing happens
}

// TestBackoffAfterGivingBack: a tunnel given back is reopened within
// MinBackoff; refusals in a row double that, up to the restart cap, and an
// admitted tunnel starts it over. The backoff of failures is left alone,
// unless the tunnel given back had lived as long as a healthy one.
func TestBackoffAfterGivingBack(t *testing.T) {
	b := backoff{min: 10 * time.Millisecond, max: time.Second, rand: highest, now: newFakeClock().now}
	b.init()
	ms := time.Millisecond
	for _, want := range []time.Duration{10, 20} {
		if d := b.after(false, 0, errBoom); d != want*ms {
			t.Fatalf("failure: delay %v; want %v", d, want*ms)
		}
	}
	for _, want := range []time.Duration{10, 20, 40, 40} {
		if d := b.givenBack(0); d != want*ms {
			t.Fatalf("refused in a row: delay %v; want %v", d, want*ms)
		}
	}
	b.admitted()
	if d := b.givenBack(ms); d != 10*ms {
		t.Fatalf("given back after an admitted tunnel: delay %v; want 10ms", d)
	}
	if d := b.after(false, 0, errBoom); d != 40*ms {
		t.Fatalf("failure after the refusals: delay %v; want 40ms, where failures had left it", d)
	}
	b.admitted()
	b.givenBack(time.Second)
	if d := b.after(false, 0, errBoom); d != 10*ms {
		t.Fatalf("failure after a healthy tunnel was given back: delay %v; want 10ms", d)
	}
}
