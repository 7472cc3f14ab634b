package tunnel

// The peers that tests play by hand, frame by frame over a real outer
// stream, as a peer that knows only the published protocol would (the
// frames themselves come from frames_builders_test.go):
//
//   - rawTunnel, the network client of a forward tunnel opened on a
//     TunnelServiceHandler (openRaw, openRawNegotiated), driving its tunnel
//     server;
//   - fakeNetworkServer, a TunnelService each test writes by hand
//     (startFake), and fakeNet over it, which hands each tunnel-opening RPC
//     to the test as a fakeConn: the network server's end of a NewChannel
//     client's forward tunnel (openChannel) or of a ReverseTunnelServer's
//     reverse tunnel (serveReverse).
//
// Every tunnel opened with peerContext, openRawNegotiated or fakeNet ends at
// peerDeadline at the latest, so that a read never blocks a test for ever.

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/internal/loopback"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// rawTunnel is the network-client end of a forward tunnel driven by hand.
type rawTunnel struct {
	t      *testing.T
	stream tunnelpb.TunnelService_OpenTunnelClient
	header metadata.MD
	cancel context.CancelFunc
}

func openRaw(t *testing.T, stub tunnelpb.TunnelServiceClient, negotiate bool, headers ...string) *rawTunnel {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	if negotiate {
		ctx = metadata.AppendToOutgoingContext(ctx, "grpctunnel-negotiate", "on")
	}
	ctx = metadata.AppendToOutgoingContext(ctx, headers...)
	stream, err := stub.OpenTunnel(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	hdr, err := stream.Header()
	if err != nil {
		t.Fatal(err)
	}
	return &rawTunnel{t: t, stream: stream, header: hdr, cancel: cancel}
}

func (r *rawTunnel) send(f *tunnelpb.ClientToServer) {
	r.t.Helper()
	if err := r.stream.Send(f); err != nil {
		r.t.Fatalf("send: %v", err)
	}
}

func (r *rawTunnel) recv() *tunnelpb.ServerToClient {
	r.t.Helper()
	f, err := r.stream.Recv()
	if err != nil {
		r.t.Fatalf("recv: %v", err)
	}
	return f
}

// sendMessage sends b as one message in chunks of at most 16 KiB.
func (r *rawTunnel) sendMessage(id int64, b []byte) {
	r.t.Helper()
	for _, f := range messageFrames(clientFramer(id), b, 16384) {
		r.send(f)
	}
}

// readResponse collects one call's response frames until close_stream,
// granting window as data arrives when grant is set.
func (r *rawTunnel) readResponse(id int64, grant bool) (msgs [][]byte, st *status.Status) {
	r.t.Helper()
	var cur []byte
	want := -1
	for {
		f := r.recv()
		if f.GetStreamId() != id {
			r.t.Fatalf("frame for stream %d while reading %d: %v", f.GetStreamId(), id, f)
		}
		var chunk []byte
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ServerToClient_ResponseHeaders:
			continue
		case *tunnelpb.ServerToClient_ResponseMessage:
			want, cur, chunk = int(fr.ResponseMessage.GetSize()), nil, fr.ResponseMessage.GetData()
		case *tunnelpb.ServerToClient_MoreResponseData:
			chunk = fr.MoreResponseData
		case *tunnelpb.ServerToClient_CloseStream:
			return msgs, status.FromProto(fr.CloseStream.GetStatus())
		default:
			r.t.Fatalf("unexpected frame %v", f)
		}
		if len(chunk) > 16384 {
			r.t.Fatalf("chunk of %d bytes exceeds 16 KiB", len(chunk))
		}
		cur = append(cur, chunk...)
		if grant && len(chunk) > 0 {
			r.send(windowUpdateFrame(id, uint32(len(chunk))))
		}
		if len(cur) == want {
			msgs = append(msgs, cur)
			want = -1
		}
	}
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fakeNetworkServer is a TunnelService whose methods each test writes by
// hand, to play a plain peer against this package's network clients.
type fakeNetworkServer struct {
	tunnelpb.UnimplementedTunnelServiceServer
	forward func(tunnelpb.TunnelService_OpenTunnelServer) error
	reverse func(tunnelpb.TunnelService_OpenReverseTunnelServer) error
}

func (f *fakeNetworkServer) OpenTunnel(s tunnelpb.TunnelService_OpenTunnelServer) error {
	return f.forward(s)
}

func (f *fakeNetworkServer) OpenReverseTunnel(s tunnelpb.TunnelService_OpenReverseTunnelServer) error {
	return f.reverse(s)
}

func startFake(t *testing.T, f *fakeNetworkServer) tunnelpb.TunnelServiceClient {
	t.Helper()
	srv := grpc.NewServer()
	tunnelpb.RegisterTunnelServiceServer(srv, f)
	return tunnelpb.NewTunnelServiceClient(loopback.Serve(t, srv))
}

// peerDeadline bounds every tunnel the peers open, so that a library that
// hangs fails the test with DeadlineExceeded rather than stalling the run.
const peerDeadline = 30 * time.Second

// peerContext returns a context that ends at peerDeadline or when the test
// ends.
func peerContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), peerDeadline)
	t.Cleanup(cancel)
	return ctx
}

// openRawNegotiated opens a forward tunnel by hand as openRaw does,
// negotiating revision one, and reads the settings. The tunnel ends at
// peerDeadline at the latest, so that no read can block the test for ever.
func openRawNegotiated(t *testing.T, stub tunnelpb.TunnelServiceClient, headers ...string) *rawTunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), peerDeadline)
	t.Cleanup(cancel)
	ctx = metadata.AppendToOutgoingContext(ctx, "grpctunnel-negotiate", "on")
	ctx = metadata.AppendToOutgoingContext(ctx, headers...)
	stream, err := stub.OpenTunnel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hdr, err := stream.Header()
	if err != nil {
		t.Fatal(err)
	}
	r := &rawTunnel{t: t, stream: stream, header: hdr, cancel: cancel}
	if f := r.recv(); f.GetSettings() == nil {
		t.Fatalf("first frame is not settings: %v", f)
	}
	return r
}

// rawEcho makes a well-formed unary call on a raw tunnel.
func rawEcho(t *testing.T, r *rawTunnel, id int64) {
	t.Helper()
	req := mustMarshal(t, bytesValue([]byte("still here")))
	r.send(newStreamFrame(id, probeUnary, rev1, 65536))
	r.sendMessage(id, req)
	r.send(halfCloseFrame(id))
	if msgs, st := r.readResponse(id, false); st.Code() != codes.OK || len(msgs) != 1 || string(msgs[0]) != string(req) {
		t.Fatalf("a well-formed call on the tunnel: %q, %v", msgs, st)
	}
}

// fakeNet is a fake network server that hands each tunnel-opening RPC to the
// test, which then plays the network server's end frame by frame.
type fakeNet struct {
	stub tunnelpb.TunnelServiceClient
	fwd  chan *fakeConn
	rev  chan *fakeConn
}

// fakeConn is one opening RPC held by the fake: fwd or rev is set. Sending
// on end makes the RPC return that error.
type fakeConn struct {
	fwd tunnelpb.TunnelService_OpenTunnelServer
	rev tunnelpb.TunnelService_OpenReverseTunnelServer
	end chan error
}

func startFakeNet(t *testing.T) *fakeNet {
	n := &fakeNet{fwd: make(chan *fakeConn), rev: make(chan *fakeConn)}
	n.stub = startFake(t, &fakeNetworkServer{
		forward: func(s tunnelpb.TunnelService_OpenTunnelServer) error {
			return n.hand(s.Context(), &fakeConn{fwd: s, end: make(chan error, 1)}, n.fwd)
		},
		reverse: func(s tunnelpb.TunnelService_OpenReverseTunnelServer) error {
			return n.hand(s.Context(), &fakeConn{rev: s, end: make(chan error, 1)}, n.rev)
		},
	})
	return n
}

func (n *fakeNet) hand(ctx context.Context, c *fakeConn, to chan *fakeConn) error {
	select {
	case to <- c:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-c.end:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fakeOpening is the network server's response headers: negotiation on
// unless negotiate is false, and ext as the accepted extensions.
func fakeOpening(negotiate bool, ext string) metadata.MD {
	md := metadata.Pairs("x-hos", "1") // never empty: no headers is a refusal
	if negotiate {
		md.Set("grpctunnel-negotiate", "on")
	}
	if ext != "" {
		md.Set("grpctunnel-extensions", ext)
	}
	return md
}

// openChannel starts a NewChannel tunnel over stub, which must lead to n,
// and plays the network server's opening: headers, then settings if
// negotiated. It returns the channel and the network server's end.
func (n *fakeNet) openChannel(t *testing.T, stub tunnelpb.TunnelServiceClient, negotiate bool, ext string, opts ...TunnelOption) (TunnelChannel, *fakeConn) {
	t.Helper()
	type started struct {
		ch  TunnelChannel
		err error
	}
	res := make(chan started, 1)
	ctx := peerContext(t)
	go func() {
		ch, err := NewChannel(stub, opts...).Start(ctx)
		res <- started{ch, err}
	}()
	c := recvWithin(t, n.fwd, "the tunnel-opening RPC")
	if err := c.fwd.SendHeader(fakeOpening(negotiate, ext)); err != nil {
		t.Fatal(err)
	}
	if negotiate {
		if err := c.fwd.Send(serverSettingsFrame(-1, 65536, tunnelpb.ProtocolRevision_REVISION_ZERO, rev1)); err != nil {
			t.Fatal(err)
		}
	}
	s := recvWithin(t, res, "the channel to start")
	if s.err != nil {
		t.Fatal(s.err)
	}
	t.Cleanup(s.ch.Close)
	return s.ch, c
}

// recvFwd reads the tunnel client's next frame on a forward tunnel.
func (c *fakeConn) recvFwd(t *testing.T) *tunnelpb.ClientToServer {
	t.Helper()
	f, err := c.fwd.Recv()
	if err != nil {
		t.Fatalf("network server's recv: %v", err)
	}
	return f
}

func (c *fakeConn) sendFwd(t *testing.T, frames ...*tunnelpb.ServerToClient) {
	t.Helper()
	for _, f := range frames {
		if err := c.fwd.Send(f); err != nil {
			t.Fatalf("network server's send: %v", err)
		}
	}
}

// readUnary reads the frames of one unary call from the tunnel client (its
// new_stream, request and half-close) and returns the stream ID and the
// request.
func (c *fakeConn) readUnary(t *testing.T) (int64, []byte) {
	t.Helper()
	f := c.recvFwd(t)
	if f.GetNewStream() == nil {
		t.Fatalf("expected a new_stream, got %v", f)
	}
	id := f.GetStreamId()
	m := c.recvFwd(t)
	if m.GetStreamId() != id || m.GetRequestMessage() == nil || int(m.GetRequestMessage().GetSize()) != len(m.GetRequestMessage().GetData()) {
		t.Fatalf("expected the whole request of stream %d, got %v", id, m)
	}
	if h := c.recvFwd(t); h.GetStreamId() != id || h.GetHalfClose() == nil {
		t.Fatalf("expected the half-close of stream %d, got %v", id, h)
	}
	return id, m.GetRequestMessage().GetData()
}

// backgroundUnary runs a unary call in the background; its error arrives on
// the returned channel.
func backgroundUnary(ctx context.Context, cc grpc.ClientConnInterface, in []byte) <-chan error {
	errc := make(chan error, 1)
	go func() {
		_, err := unary(ctx, cc, in)
		errc <- err
	}()
	return errc
}

// fakeEcho makes a call on ch and answers it as a well-behaved server would.
func fakeEcho(t *testing.T, ch TunnelChannel, c *fakeConn) {
	t.Helper()
	out := make(chan []byte, 1)
	errc := make(chan error, 1)
	ctx := peerContext(t)
	go func() {
		b, err := unary(ctx, ch, []byte("echo"))
		out <- b
		errc <- err
	}()
	id, req := c.readUnary(t)
	c.sendFwd(t, responseFrame(id, uint32(len(req)), req), closeCodeFrame(id, codes.OK, nil))
	if err := recvWithin(t, errc, "the echo call"); err != nil {
		t.Fatalf("a well-formed call on the tunnel: %v", err)
	}
	if b := <-out; string(b) != "echo" {
		t.Fatalf("echo returned %q", b)
	}
}

// serveReverse starts rs.Serve, which must reach n, and plays the network
// server's opening: headers, then it reads the settings. It returns the
// network server's end and Serve's result.
func (n *fakeNet) serveReverse(t *testing.T, rs *ReverseTunnelServer, ext string) (*fakeConn, <-chan error) {
	t.Helper()
	res := make(chan error, 1)
	ctx := peerContext(t)
	go func() {
		started, err := rs.Serve(ctx)
		if !started && err == nil {
			err = errors.New("not started")
		}
		res <- err
	}()
	c := recvWithin(t, n.rev, "the reverse tunnel-opening RPC")
	if err := c.rev.SendHeader(fakeOpening(true, ext)); err != nil {
		t.Fatal(err)
	}
	if f := c.recvRev(t); f.GetSettings() == nil || f.GetStreamId() != -1 {
		t.Fatalf("first frame is not settings: %v", f)
	}
	return c, res
}

func (c *fakeConn) recvRev(t *testing.T) *tunnelpb.ServerToClient {
	t.Helper()
	f, err := c.rev.Recv()
	if err != nil {
		t.Fatalf("network server's recv: %v", err)
	}
	return f
}

func (c *fakeConn) sendRev(t *testing.T, frames ...*tunnelpb.ClientToServer) {
	t.Helper()
	for _, f := range frames {
		if err := c.rev.Send(f); err != nil {
			t.Fatalf("network server's send: %v", err)
		}
	}
}

// closeOf reads from a reverse tunnel's tunnel server until the
// close_stream of stream id, failing on frames of other streams.
func (c *fakeConn) closeOf(t *testing.T, id int64) (body []byte, st *status.Status) {
	t.Helper()
	for {
		f := c.recvRev(t)
		if f.GetStreamId() != id {
			t.Fatalf("frame for stream %d while reading %d: %v", f.GetStreamId(), id, f)
		}
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ServerToClient_ResponseMessage:
			body = append(body, fr.ResponseMessage.GetData()...)
		case *tunnelpb.ServerToClient_MoreResponseData:
			body = append(body, fr.MoreResponseData...)
		case *tunnelpb.ServerToClient_CloseStream:
			return body, status.FromProto(fr.CloseStream.GetStatus())
		}
	}
}

// revEcho makes a well-formed unary call through a reverse tunnel, as its
// network server.
func (c *fakeConn) revEcho(t *testing.T, id int64) {
	t.Helper()
	req := mustMarshal(t, bytesValue([]byte("ping")))
	c.sendRev(t, newStreamFrame(id, probeUnary, rev1, 65536), messageFrame(id, uint32(len(req)), req), halfCloseFrame(id))
	if body, st := c.closeOf(t, id); st.Code() != codes.OK || string(body) != string(req) {
		t.Fatalf("a well-formed call on the reverse tunnel: %q, %v", body, st)
	}
}

// peerReverseServer returns a ReverseTunnelServer serving p, stopped at
// cleanup.
func peerReverseServer(t *testing.T, stub tunnelpb.TunnelServiceClient, p *probe, opts ...TunnelOption) *ReverseTunnelServer {
	rs := NewReverseTunnelServer(stub, opts...)
	rs.RegisterService(&probeDesc, p)
	t.Cleanup(rs.Stop)
	return rs
}
