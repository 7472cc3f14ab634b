package tunnel

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// serverStream is one tunneled call on the handling side; it implements
// grpc.ServerStream for the handler and grpc.ServerTransportStream so that
// grpc.SetHeader, grpc.SendHeader, grpc.SetTrailer and grpc.Method work on
// its context.
type serverStream struct {
	t       *tunnelServer
	id      int64
	ctx     context.Context // the handler's
	done    <-chan struct{} // ctx.Done(), for the reader
	cancel  context.CancelFunc
	method  string
	kind    methodKind
	handler callHandler
	codec   encoding.CodecV2
	comp    encoding.Compressor // of the requests, and so of the responses
	window  *flowcontrol.SendWindow
	in      *inbound
	stats   callStats
	// frames are the response frames, built in place; made by the first
	// message that does not leave with the call's status. Handler-owned.
	frames *serverDataFrame

	// state is the call's serverState (see server_state.go): read anywhere
	// with one atomic load, changed only by transition, under mu.
	state atomic.Uint32

	mu      sync.Mutex
	header  metadata.MD
	trailer metadata.MD
	result  error // the status the call ended with, once callClosed

	// Handler-owned.
	sent int
}

func grpcServerTransportContext(ctx context.Context, st *serverStream) context.Context {
	return grpc.NewContextWithServerTransportStream(ctx, (*transportStream)(st))
}

// transportStream is the stream as grpc.ServerTransportStream, whose
// SetTrailer differs from grpc.ServerStream's only in returning an error.
type transportStream serverStream

func (ts *transportStream) Method() string                 { return ts.method }
func (ts *transportStream) SetHeader(md metadata.MD) error { return (*serverStream)(ts).SetHeader(md) }
func (ts *transportStream) SendHeader(md metadata.MD) error {
	return (*serverStream)(ts).SendHeader(md)
}
func (ts *transportStream) SetTrailer(md metadata.MD) error {
	return (*serverStream)(ts).setTrailer(md)
}

// run calls the handler and closes the stream with its result.
func (st *serverStream) run() {
	defer st.t.handlers.Done()
	resp, err := st.handler(st)
	if err == nil && resp != nil {
		st.close(nil, false, resp)
	} else {
		st.close(err, false, nil)
	}
	if st.stats.on() {
		st.mu.Lock()
		result := st.result
		st.mu.Unlock()
		st.stats.end(nil, result)
	}
}

// Reader side: server_tunnel.go's dispatch hands each frame for the call to
// one of these.

// onMessage handles the first chunk of a request message.
func (st *serverStream) onMessage(size uint32, data *chunk) {
	if !st.allowed(serverGotMessage) {
		return
	}
	update, err := st.in.startMessage(size, data)
	st.afterData(update, err)
}

// onMoreData handles a further chunk of a request message.
func (st *serverStream) onMoreData(data *chunk) {
	if !st.allowed(serverGotData) {
		return
	}
	st.afterData(0, st.in.moreData(data))
}

// onHalfClose handles the client's half_close: RecvMsg reports io.EOF once
// the requests queued are read.
func (st *serverStream) onHalfClose() {
	if st.in.active {
		// The reassembly's rule, judged before the call's: a message
		// cut short by half_close breaks it.
		st.fail(errHalfCloseMidMessage)
		return
	}
	if !st.allowed(serverGotHalfClose) {
		return
	}
	st.in.finish(io.EOF)
}

// onWindowUpdate handles the client's window_update for the call, allowed
// in every state: an update that overflows the window breaks the rules.
func (st *serverStream) onWindowUpdate(n uint32) {
	if err := st.window.Add(n); err != nil {
		st.fail(windowOverflow(err))
	}
}

// allowed applies ev, a frame from the client, and reports whether the
// frame is to be handled: not if it broke the call's rules, which ends the
// call, nor if it raced with the call's end.
func (st *serverStream) allowed(ev serverEvent) bool {
	_, err := st.transition(ev)
	switch {
	case err == nil:
		return true
	case !errors.Is(err, errLate):
		st.fail(err)
	}
	return false
}

func (st *serverStream) afterData(update uint32, err error) {
	if err != nil {
		st.fail(err)
		return
	}
	if update > 0 {
		st.t.out.Queue(serverFramer(st.id).windowUpdate(update))
	}
	st.in.waitForSpace(st.done)
}

// fail ends the call with err because the client broke the rules for it.
func (st *serverStream) fail(err error) {
	st.in.abort(err)
	st.close(err, true, nil)
}

// onCancel handles the client's cancel: the handler's context is cancelled
// and nothing more is sent.
func (st *serverStream) onCancel() {
	st.mu.Lock()
	if _, late := st.transitionLocked(serverGotCancel); late == nil {
		st.result = errCancelledByClient
	}
	st.mu.Unlock()
	// Done even when the call was over already: they are idempotent, and
	// the end may not have got as far.
	st.in.abort(errCancelledByClient)
	st.cancel()
	st.t.forget(st.id)
}

// close ends the call with err, or, when the handler returned a unary
// response resp, with that response followed by an OK status, so that
// response, status and trailers leave in one hold of the sender.
func (st *serverStream) close(err error, fromReader bool, resp any) {
	if resp != nil {
		if err = st.sendLast(resp); err == nil {
			return
		}
	}
	st.end(err, fromReader, lastMessage{})
}

// sendLast sends a unary call's response followed at once by its status. It
// falls back to SendMsg when the response needs more than one chunk or more
// window than there is, and reports any failure for close to send instead.
func (st *serverStream) sendLast(resp any) error {
	data, length, err := st.marshal(resp)
	if err != nil {
		return err
	}
	defer data.Free()
	size := data.Len()
	if size > st.t.agreed.maxChunk || !st.window.TryTake(size) {
		if err := st.sendMessage(resp, data, length); err != nil {
			return err
		}
		st.end(nil, false, lastMessage{})
		return nil
	}
	st.end(nil, false, lastMessage{serverFramer(st.id).message(uint32(size), contiguous(data)), resp, length})
	return nil
}

// lastMessage is a unary call's response, sent with its status: frame, the
// response m and its length before compression, for stats.
type lastMessage struct {
	frame  *tunnelpb.ServerToClient
	m      any
	length int
}

// end finishes the call, once: it sends any headers still due, then last's
// frame (a final response, if not nil), then the status and trailers. The
// reader queues these frames (it must not block); the handler's goroutine
// sends them itself, in one hold of the sender.
func (st *serverStream) end(err error, fromReader bool, last lastMessage) {
	st.mu.Lock()
	from, late := st.transitionLocked(serverClose)
	if late != nil {
		st.mu.Unlock()
		st.cancel()
		return
	}
	s := statusOf(err)
	var buf [3]*tunnelpb.ServerToClient
	frames := buf[:0]
	if f, hdrErr := st.pendingHeaderLocked(from, last.frame != nil); hdrErr != nil {
		// Headers that cannot be encoded end the call with why, as
		// trailers that cannot be do (see closeFrame); the response, if
		// any, does not go without them.
		s = status.Convert(hdrErr)
		last = lastMessage{}
	} else if f != nil {
		frames = append(frames, f)
	}
	st.result = s.Err()
	header, trailer := st.header, st.trailer
	st.mu.Unlock()
	sentHeader := len(frames) > 0
	if last.frame != nil {
		frames = append(frames, last.frame)
	}
	frames = append(frames, st.closeFrame(s, trailer))
	// Requests the handler left unread are dropped, and their bytes
	// returned to the tunnel's budget.
	st.in.abort(errStreamClosed)
	// A send that fails here is not reported to anyone, rightly: the
	// handler has returned, and the failure is the whole tunnel's. A hold
	// that fails means the sender already failed or was closed, or the
	// tunnel ended, so the tunnel is ending already; or that the call's
	// context ended while the outer stream was busy, and then the client
	// needs no status from here either: it cancelled the call or its own
	// deadline, which this one derives from, ends it. A handler whose peer
	// stopped reading thus returns with its context rather than wait for
	// the outer stream. A sendLocked that fails makes release call
	// the sender's onFail, which shuts the tunnel down with the cause
	// (tunnelFailure), and that ends every call on it. The client learns
	// of it from its own end of the outer stream.
	if fromReader {
		for _, f := range frames {
			st.t.out.Queue(f)
		}
	} else if st.t.out.hold(st.done) == nil {
		for _, f := range frames {
			if st.t.out.sendLocked(f) != nil {
				break
			}
		}
		st.t.out.release()
	}
	if st.stats.on() {
		if sentHeader {
			st.stats.outHeader(st.method, nil, header, compressorName(st.comp))
		}
		if last.frame != nil {
			st.stats.outPayload(last.m, last.length, int(last.frame.GetResponseMessage().GetSize()))
		}
		st.stats.outTrailer(trailer)
	}
	st.cancel()
	st.t.forget(st.id)
}

// pendingHeaderLocked returns the header frame still to send before the end
// of a call that was in state from, if the handler set headers that have
// not gone out, or a compressed message is to follow (the headers name its
// compressor); nil if there is none. It fails if the headers cannot be
// encoded.
func (st *serverStream) pendingHeaderLocked(from serverState, message bool) (*tunnelpb.ServerToClient, error) {
	if from&respHeadersSent != 0 || (len(st.header) == 0 && (!message || st.comp == nil)) {
		return nil, nil
	}
	return st.headerFrame(st.header)
}

// closeFrame builds the close_stream frame for a call that ended with s.
func (st *serverStream) closeFrame(s *status.Status, trailer metadata.MD) *tunnelpb.ServerToClient {
	pbTrailer, encErr := encodeMetadata(trailer, st.t.agreed.binaryMetadata)
	if encErr != nil {
		s = status.Convert(errMetadataOut(encErr))
		pbTrailer = nil
	}
	return serverFramer(st.id).closeStream(s, pbTrailer)
}

// statusOf turns a handler's result into the status sent to the client.
func statusOf(err error) *status.Status {
	if err == nil {
		return status.New(codes.OK, "")
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		if _, ok := status.FromError(err); !ok {
			return status.FromContextError(err)
		}
	}
	return status.Convert(err)
}

func (st *serverStream) headerFrame(md metadata.MD) (*tunnelpb.ServerToClient, error) {
	pb, err := encodeMetadata(md, st.t.agreed.binaryMetadata)
	if err != nil {
		return nil, errMetadataOut(err)
	}
	pb = withEncoding(pb, st.comp)
	return serverFramer(st.id).headers(pb), nil
}

// Handler side: grpc.ServerStream.

func (st *serverStream) Context() context.Context { return st.ctx }

func (st *serverStream) SetHeader(md metadata.MD) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, err := st.transitionLocked(serverSetHeader); err != nil {
		return err
	}
	st.header = metadata.Join(st.header, md)
	return nil
}

func (st *serverStream) SendHeader(md metadata.MD) error {
	if err := st.SetHeader(md); err != nil {
		return err
	}
	return st.flushHeader(true)
}

// flushHeader sends the headers if they have not gone yet. Before a message
// (explicit false) empty headers are skipped: the protocol makes them
// optional and the client takes the first message as their end, which saves
// a frame per call. SendHeader (explicit true) always sends, since the
// client may be waiting for headers alone.
func (st *serverStream) flushHeader(explicit bool) error {
	st.mu.Lock()
	_, err := st.transitionLocked(serverSendHeader)
	md := st.header
	st.mu.Unlock()
	switch {
	case errors.Is(err, errLate):
		return nil // sent already
	case err != nil:
		return err
	}
	if !explicit && len(md) == 0 && st.comp == nil {
		// Skipped, but to the client they end at the first message.
		st.stats.outHeader(st.method, nil, md, "")
		return nil
	}
	f, err := st.headerFrame(md)
	if err != nil {
		return err
	}
	if err := st.t.out.Send(st.done, f); err != nil {
		if errors.Is(err, errDone) {
			return status.FromContextError(st.ctx.Err()).Err()
		}
		return tunnelFailed(err)
	}
	st.stats.outHeader(st.method, nil, md, compressorName(st.comp))
	return nil
}

func (st *serverStream) SetTrailer(md metadata.MD) { _ = st.setTrailer(md) }

func (st *serverStream) setTrailer(md metadata.MD) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, err := st.transitionLocked(serverSetTrailer); err != nil {
		return err
	}
	st.trailer = metadata.Join(st.trailer, md)
	return nil
}

func (st *serverStream) SendMsg(m any) error {
	data, length, err := st.marshal(m)
	if err != nil {
		return err
	}
	defer data.Free()
	return st.sendMessage(m, data, length)
}

// marshal encodes a response for the wire (see encodeMessage), checking
// what gRPC checks before sending.
func (st *serverStream) marshal(m any) (mem.BufferSlice, int, error) {
	if err := st.ctx.Err(); err != nil {
		return nil, 0, status.FromContextError(err).Err()
	}
	if !st.kind.serverStreams && st.sent > 0 {
		return nil, 0, errSecondResponse
	}
	return encodeMessage(st.codec, st.comp, st.t.opts.maxSendMsgSize, m)
}

// sendMessage sends response m, encoded as data (length bytes before
// compression), headers first if they are due.
func (st *serverStream) sendMessage(m any, data mem.BufferSlice, length int) error {
	if err := st.flushHeader(false); err != nil {
		return err
	}
	st.sent++
	if st.frames == nil {
		st.frames = &serverDataFrame{ServerToClient: tunnelpb.ServerToClient{StreamId: st.id}}
	}
	err := sendMessage(st.t.out, st.window, st.ctx.Done(), st.frames, data, st.t.agreed.maxChunk)
	switch {
	case err == nil:
		st.stats.outPayload(m, length, data.Len())
		return nil
	case errors.Is(err, errDone):
		return status.FromContextError(st.ctx.Err()).Err()
	default:
		return tunnelFailed(err)
	}
}

func (st *serverStream) RecvMsg(m any) error {
	msg, update, err := st.in.recv(st.ctx.Done())
	if err != nil {
		if errors.Is(err, errDone) {
			return status.FromContextError(st.ctx.Err()).Err()
		}
		return err
	}
	if update > 0 {
		st.t.out.Queue(serverFramer(st.id).windowUpdate(update))
	}
	data := msg.gathered()
	wire := data.Len()
	length, err := decodeMessage(st.codec, st.comp, st.t.opts.maxRecvMsgSize, data, m, "request")
	if err != nil {
		return err
	}
	st.stats.inPayload(m, length, wire)
	return nil
}

// recvUnaryRequest reads the one request of a unary-request method.
func (st *serverStream) recvUnaryRequest(m any) error {
	err := st.RecvMsg(m)
	if errors.Is(err, io.EOF) {
		return errNoRequest
	}
	return err
}
