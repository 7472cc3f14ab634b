package tunnel

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// clientStream is one call issued through a tunnel; it implements
// grpc.ClientStream. The reader goroutine feeds it frames, the caller's
// goroutine sends and receives, and a context.AfterFunc cancels it: no
// goroutine of its own.
type clientStream struct {
	t      *tunnelClient
	id     int64
	ctx    context.Context
	desc   *grpc.StreamDesc
	ci     *callInfo
	window *flowcontrol.SendWindow
	in     *inbound
	stop   func() bool // stops the context watch
	stats  callStats
	// frames are the request frames, built in place; made by the first
	// message that does not leave with the call's opening. Caller-owned.
	frames *clientDataFrame

	// state is the call's clientState (see client_state.go): read anywhere
	// with one atomic load, changed only by transition, under mu.
	state atomic.Uint32
	mu    sync.Mutex

	// recvComp decompresses responses; set by the reader before the first
	// response is queued, read by the caller after.
	recvComp encoding.Compressor

	// header is set before headerReady closes; trailer and closeErr before
	// ended closes. They are read only after. transition sets them and
	// closes the channels.
	header      metadata.MD
	headerReady chan struct{}
	trailer     metadata.MD
	closeErr    error // the server's status, or the local reason for ending
	ended       chan struct{}

	// final is the call's result, which RecvMsg returns once the call is
	// callFinished; only the caller's goroutine touches it.
	final error
}

func (t *tunnelClient) newStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts []grpc.CallOption) (*clientStream, error) {
	ci, err := t.newCallInfo(opts)
	if err != nil {
		return nil, err
	}
	st, err := t.startStream(ctx, desc, method, ci, nil, nil, 0)
	if err != nil {
		ci.finish(nil, nil, t.peer, t, err)
		return nil, err
	}
	return st, nil
}

// startStream opens a call. If only is not nil, it is the call's one and only
// request, req encoded (length bytes before compression): when it fits in a
// single chunk it goes out with the new_stream frame and the half-close, in
// one hold of the sender, and the stream comes back callHalfClosed.
func (t *tunnelClient) startStream(ctx context.Context, desc *grpc.StreamDesc, method string, ci *callInfo, req any, only mem.BufferSlice, length int) (_ *clientStream, err error) {
	select {
	case <-t.ready:
	case <-t.done:
		return nil, unstarted(t.unavailable())
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	st := &clientStream{
		t:           t,
		desc:        desc,
		ci:          ci,
		headerReady: make(chan struct{}),
		ended:       make(chan struct{}),
	}
	if h := t.opts.clientStats; h != nil {
		// Tagged first: a tracing handler puts its context in the
		// outgoing metadata read below.
		ctx = st.stats.beginClient(h, ctx, method, desc.ClientStreams, desc.ServerStreams, !ci.waitForReady)
		defer func() {
			if err != nil {
				st.stats.end(nil, err)
			}
		}()
	}
	// A copy already, which the credentials may add to.
	md, _ := metadata.FromOutgoingContext(ctx)
	creds, err := ci.requestCredentials(ctx, method, t.authInfo())
	if err != nil {
		return nil, err
	}
	if md == nil {
		md = metadata.MD{}
	}
	for k, v := range creds {
		md.Append(k, v)
	}
	headers, err := encodeMetadata(md, t.agreed.binaryMetadata)
	if err != nil {
		return nil, errMetadataOut(err)
	}
	if dl, ok := ctx.Deadline(); ok {
		// encodeMetadata drops reserved keys, a caller's grpc-timeout among
		// them; the deadline is ours to send.
		headers.Md[timeoutHeader] = &tunnelpb.Metadata_Values{Val: []string{encodeTimeout(time.Until(dl))}}
	}
	headers = withEncoding(headers, ci.comp)

	ctx = context.WithValue(ctx, tunnelChannelKey{}, TunnelChannel(t))
	if t.peer != nil {
		ctx = peer.NewContext(ctx, t.peer)
	}
	if t.openedMD != nil {
		ctx = context.WithValue(ctx, tunnelOutgoingMDKey{}, t.openedMD)
	}
	st.ctx = ctx
	revision := tunnelpb.ProtocolRevision_REVISION_ZERO
	var recvWin *flowcontrol.RecvWindow
	if t.flowControl {
		revision = tunnelpb.ProtocolRevision_REVISION_ONE
		st.window = flowcontrol.NewSendWindow(t.peerWindow)
		recvWin = t.opts.newRecvWindow(&t.hint)
	} else {
		st.window = flowcontrol.Unlimited()
	}
	st.in = newInbound(recvWin, int(t.opts.initialWindow), ci.maxRecv, &t.buffered, "response")

	ns := &tunnelpb.NewStream{
		MethodName:       method,
		RequestHeaders:   headers,
		ProtocolRevision: revision,
	}
	if t.flowControl {
		// A window that starts from a learned size announces all of it.
		ns.InitialWindowSize = t.opts.initialWindow + recvWin.Grant()
	}
	withRequest := only != nil && only.Len() <= t.agreed.maxChunk && st.window.TryTake(only.Len())
	// Reported before the frames leave, so that they precede whatever the
	// reader reports of the response; a failure is reported by End.
	st.stats.outHeader(method, t.peer, md, compressorName(ci.comp))
	if withRequest {
		st.stats.outPayload(req, length, only.Len())
	}
	var request []byte
	if withRequest {
		request = contiguous(only)
		if request == nil {
			request = []byte{}
		}
	}
	err = t.register(ctx, st, ns, request)
	if withRequest {
		st.transition(clientChange{ev: clientCloseSend})
	}
	if err != nil {
		return nil, err
	}
	st.stop = context.AfterFunc(ctx, func() {
		err := status.FromContextError(ctx.Err()).Err()
		st.abort(err, true)
		// As in gRPC, a call whose context ends is over for stats handlers
		// even if the caller never reads its result.
		st.stats.end(nil, err)
	})
	return st, nil
}

// Reader side.

// onHeaders handles the server's response_headers.
func (st *clientStream) onHeaders(md *tunnelpb.Metadata) {
	// Judged before the headers are decoded, so that headers that come
	// twice are refused as such whatever they hold. Only the reader moves
	// the call on from callAwaitingHeaders, so the judgement holds until
	// the transition below, unless the call ends meanwhile: the transition
	// then finds it ended and changes nothing.
	if err := st.check(clientGotHeaders); err != nil {
		if !errors.Is(err, errLate) {
			st.abort(err, true)
		}
		return
	}
	hdr, err := st.t.opts.decodeMetadata(md, st.t.agreed.binaryMetadata)
	if err == nil {
		// A compressor that is not here is one this end never asked for.
		st.recvComp, err = recvCompressor(md, st.t.agreed.compression, codes.Internal)
	}
	if err != nil {
		st.abort(err, true)
		return
	}
	// Reported before the caller can see the headers.
	st.stats.inHeader(hdr, md, compressorName(st.recvComp))
	st.transition(clientChange{ev: clientGotHeaders, header: hdr})
}

// onMessage handles the first chunk of a response message. Past the first,
// it costs one atomic load of the state and no lock.
func (st *clientStream) onMessage(size uint32, data *chunk) {
	if clientState(st.state.Load()).received() == callAwaitingHeaders {
		// The peer skipped empty headers; the message ends them. Reported
		// before the caller can see them, as onHeaders does.
		st.stats.inHeader(metadata.MD{}, nil, "")
	}
	if _, err := st.transition(clientChange{ev: clientGotMessage}); err != nil {
		return // the call has ended: the frame raced with the end
	}
	update, err := st.in.startMessage(size, data)
	st.afterData(update, err)
}

// onMoreData handles a further chunk of a response message.
func (st *clientStream) onMoreData(data *chunk) {
	if _, err := st.transition(clientChange{ev: clientGotData}); err != nil {
		return // the call has ended: the frame raced with the end
	}
	st.afterData(0, st.in.moreData(data))
}

func (st *clientStream) afterData(update uint32, err error) {
	if err != nil {
		st.abort(err, true)
		return
	}
	if update > 0 {
		st.sendWindowUpdate(update)
	}
	st.in.waitForSpace(st.ended)
}

func (st *clientStream) sendWindowUpdate(n uint32) {
	st.t.out.Queue(clientFramer(st.id).windowUpdate(n))
}

// onClose handles the server's close_stream: the call's status and trailers.
func (st *clientStream) onClose(cs *tunnelpb.CloseStream) {
	trailer, err := st.t.opts.decodeMetadata(cs.GetResponseTrailers(), st.t.agreed.binaryMetadata)
	if err != nil {
		st.abort(err, true)
		return
	}
	result := error(io.EOF)
	if s := cs.GetStatus(); s.GetCode() != int32(codes.OK) {
		result = status.ErrorProto(s)
	}
	st.stats.inTrailer(trailer, cs.GetResponseTrailers())
	// Out of the table before the caller can see the end, so that a call
	// it makes next finds the tunnel's load without this one.
	st.t.forget(st.id)
	st.transition(clientChange{ev: clientGotClose, trailer: trailer, err: result})
}

// abort ends the stream on this side with err, once, releasing anyone
// waiting for headers or send credit. tellPeer sends a cancel so the server
// stops too; it is false when the whole tunnel is gone.
func (st *clientStream) abort(err error, tellPeer bool) {
	if _, late := st.transition(clientChange{ev: clientAborted, err: err}); late != nil {
		return
	}
	if tellPeer {
		st.t.out.Queue(clientFramer(st.id).cancel())
		st.t.forget(st.id)
	}
}

// Caller side: grpc.ClientStream.

func (st *clientStream) Context() context.Context { return st.ctx }

func (st *clientStream) Header() (metadata.MD, error) {
	<-st.headerReady
	if st.header != nil {
		return st.header.Copy(), nil
	}
	// No headers: a trailers-only response or a failure.
	<-st.ended
	if errors.Is(st.closeErr, io.EOF) {
		return nil, nil
	}
	return nil, st.closeErr
}

func (st *clientStream) Trailer() metadata.MD {
	select {
	case <-st.ended:
		return st.trailer.Copy()
	default:
		return nil
	}
}

func (st *clientStream) CloseSend() error {
	if _, late := st.transition(clientChange{ev: clientCloseSend}); late != nil {
		return nil // half-closed already
	}
	select {
	case <-st.ended:
		return nil
	default:
	}
	// A failed send needs no handling here. It can fail only when the
	// sender has failed or was closed: a failure's release runs the
	// sender's onFail, which shuts the tunnel down with the cause, and the
	// sender is closed only after the tunnel ended; either way shutdown
	// ends this call with Unavailable naming the cause, and RecvMsg
	// reports it. CloseSend itself returns nil, as grpc-go's does: the
	// status is RecvMsg's to give.
	_ = st.t.out.Send(st.ended, clientFramer(st.id).halfClose())
	return nil
}

func (st *clientStream) SendMsg(m any) error {
	switch _, err := st.transition(clientChange{ev: clientSendMsg}); {
	case errors.Is(err, errLate):
		return io.EOF // the call has ended; the status comes from RecvMsg, as in gRPC
	case err != nil:
		return err
	}
	data, length, err := st.ci.marshal(m)
	if err != nil {
		return err
	}
	defer data.Free()
	return st.sendMessage(m, data, length)
}

// sendMessage sends request m, encoded as data (length bytes before
// compression), then half-closes if the method takes only one.
func (st *clientStream) sendMessage(m any, data mem.BufferSlice, length int) error {
	if st.frames == nil {
		st.frames = &clientDataFrame{ClientToServer: tunnelpb.ClientToServer{StreamId: st.id}}
	}
	if err := sendMessage(st.t.out, st.window, st.ended, st.frames, data, st.t.agreed.maxChunk); err != nil {
		// As in gRPC, SendMsg reports only that the call is over; its
		// status, with the cause, comes from RecvMsg. err is errDone if
		// the call ended while waiting for credit, or the sender's
		// failure, which has ended (or is ending) the tunnel and so this
		// call with that cause, as CloseSend explains.
		return io.EOF
	}
	st.stats.outPayload(m, length, data.Len())
	if !st.desc.ClientStreams {
		return st.CloseSend()
	}
	return nil
}

func (st *clientStream) RecvMsg(m any) error {
	if clientState(st.state.Load())&callFinished != 0 {
		return st.final
	}
	msg, update, err := st.in.recv(nil)
	if err != nil {
		// A unary-response call finishes with its one response, so one
		// that gets here has had none.
		if errors.Is(err, io.EOF) && !st.desc.ServerStreams {
			err = errNoResponse
		}
		return st.finish(err)
	}
	if update > 0 {
		st.sendWindowUpdate(update)
	}
	data := msg.gathered()
	wire := data.Len()
	length, err := decodeMessage(st.ci.codec, st.recvComp, st.ci.maxRecv, data, m, "response")
	if err != nil {
		st.abort(err, true)
		return st.finish(err)
	}
	st.stats.inPayload(m, length, wire)
	if st.desc.ServerStreams {
		return nil
	}
	// One response only: the next thing must be the end of the call.
	extra, _, err := st.in.recv(nil)
	switch {
	case err == nil:
		extra.free()
		err = errExtraResponse
		st.abort(err, true)
	case errors.Is(err, io.EOF):
		st.finish(nil)
		return nil
	}
	return st.finish(err)
}

// finish completes the call on the caller's side: it stops the context
// watch and fills in what the call options asked for. It returns err, which
// RecvMsg returns from now on.
func (st *clientStream) finish(err error) error {
	if _, late := st.transition(clientChange{ev: clientFinish}); late != nil {
		return st.final
	}
	if st.stop != nil {
		st.stop()
	}
	if err == nil {
		err = io.EOF
	}
	st.final = err
	var callErr error
	if !errors.Is(err, io.EOF) {
		callErr = err
	}
	<-st.ended
	st.stats.end(st.trailer, callErr)
	st.ci.finish(st.header, st.trailer, st.t.peer, st.t, callErr)
	return st.final
}

// Issuing calls: the tunnel as a grpc.ClientConnInterface.

// Invoke issues a unary call through the tunnel, through the client
// interceptors if the tunnel has any.
func (t *tunnelClient) Invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	if ci := t.opts.ic.unaryClient; ci != nil {
		ctx = context.WithValue(ctx, tunnelChannelKey{}, TunnelChannel(t))
		return ci(ctx, method, req, reply, nil, t.invoker, opts...)
	}
	return t.invoke(ctx, method, req, reply, opts...)
}

func (t *tunnelClient) invoker(ctx context.Context, method string, req, reply any, _ *grpc.ClientConn, opts ...grpc.CallOption) error {
	return t.invoke(ctx, method, req, reply, opts...)
}

// NewStream issues a streaming call through the tunnel, through the client
// interceptors if the tunnel has any.
func (t *tunnelClient) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if ci := t.opts.ic.streamClient; ci != nil {
		ctx = context.WithValue(ctx, tunnelChannelKey{}, TunnelChannel(t))
		return ci(ctx, desc, nil, method, t.streamer, opts...)
	}
	return t.openStream(ctx, desc, method, opts...)
}

func (t *tunnelClient) streamer(ctx context.Context, desc *grpc.StreamDesc, _ *grpc.ClientConn, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return t.openStream(ctx, desc, method, opts...)
}

var unaryStreamDesc = &grpc.StreamDesc{}

// invoke issues a unary call through the tunnel, past any interceptors (see
// Invoke). A request that fits in one chunk leaves in the same hold of the
// sender as the call's opening.
func (t *tunnelClient) invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	ci, err := t.newCallInfo(opts)
	if err != nil {
		return err
	}
	data, length, err := ci.marshal(req)
	if err != nil {
		ci.finish(nil, nil, t.peer, t, err)
		return err
	}
	defer data.Free()
	st, err := t.startStream(ctx, unaryStreamDesc, method, ci, req, data, length)
	if err != nil {
		ci.finish(nil, nil, t.peer, t, err)
		return err
	}
	if clientState(st.state.Load())&callHalfClosed == 0 {
		if err := st.sendMessage(req, data, length); err != nil && !errors.Is(err, io.EOF) {
			st.abort(err, true)
			return st.finish(err)
		}
	}
	return st.RecvMsg(reply)
}

// newCallInfo reads a call's options and resolves its compressor.
func (t *tunnelClient) newCallInfo(opts []grpc.CallOption) (*callInfo, error) {
	ci, err := newCallInfo(t.opts, opts)
	if err != nil {
		return nil, err
	}
	if ci.comp, err = ci.sendCompressor(t.agreed.compression); err != nil {
		return nil, err
	}
	return ci, nil
}

// openStream issues a streaming call through the tunnel, past any
// interceptors (see NewStream).
func (t *tunnelClient) openStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	st, err := t.newStream(ctx, desc, method, opts)
	if err != nil {
		return nil, err
	}
	return st, nil
}
