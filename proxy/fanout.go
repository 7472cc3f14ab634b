package proxy

import (
	"context"
	"errors"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// requestQueue is how many request messages a backend may lag behind the
// fastest one before the proxy stops reading the client: requests go at the
// pace of the slowest backend still running.
const requestQueue = 4

// fanCall is one call fanned out to several backends.
type fanCall struct {
	call     *Call
	field    protowire.Number
	callOpts []grpc.CallOption
	opts     *options
	backends []*fanBackend
	// resp makes the results when set; nil means labels, the path that
	// allocates nothing per message but the label's buffer slice.
	resp *Responder
	// unary is the route's Unary, and merge whether resp merges the
	// results into one response, sent once every backend has ended.
	unary, merge bool
	// failed counts the backends whose calls ended with an error.
	failed atomic.Int32

	// cancel ends every backend's call.
	cancel context.CancelFunc
	// halfClosed is set, before the request queues close, when the client
	// half-closed; otherwise closed queues mean the client is gone.
	halfClosed atomic.Bool
	// recvErr is what reading the client returned when it was neither a
	// half-close nor the end of the call.
	recvErr atomic.Pointer[error]

	// mu serializes what goes to the client.
	mu         sync.Mutex
	headerSent bool
	sendErr    error
}

// fanBackend is one backend of a fanned-out call.
type fanBackend struct {
	name string
	conn grpc.ClientConnInterface

	// reqs carries the request messages the backend has yet to send; the
	// distributor closes it when it reads no more.
	reqs chan *Frame
	// stopped is closed when the backend takes no more requests; whatever
	// is still in reqs then is freed unsent.
	stopped chan struct{}
	// ready is closed once the backend's stream is started or failed to;
	// ctx and cs are set by then (cs nil on failure).
	ready chan struct{}
	ctx   context.Context
	cs    grpc.ClientStream

	// results holds what the Responder made of b's results when they are
	// merged; only b's relay touches it until every backend has ended.
	results [][]byte
}

// fanOut runs call on every backend of route, as the package documentation
// describes. It owns call.
func fanOut(call *Call, route Route, o *options) error {
	ss := call.stream
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	fc := &fanCall{call: call, field: o.labelField, callOpts: o.callOpts, opts: o, cancel: cancel,
		resp: o.responder, unary: route.Unary}
	if route.Responder != nil {
		fc.resp = route.Responder
	}
	fc.merge = fc.unary && fc.resp != nil && fc.resp.Merge != nil
	for _, b := range route.Backends {
		fc.backends = append(fc.backends, &fanBackend{
			name:    b.Name,
			conn:    b.Conn,
			reqs:    make(chan *Frame, requestQueue),
			stopped: make(chan struct{}),
			ready:   make(chan struct{}),
		})
	}

	var started, ended sync.WaitGroup
	started.Add(len(fc.backends))
	ended.Add(len(fc.backends))
	for _, b := range fc.backends {
		go fc.sendRequests(b)
		go func() {
			defer ended.Done()
			fc.relayResponses(ctx, b, route.Metadata, &started)
		}()
	}
	// Reading the client may outlive the handler (only the call's end
	// unblocks it), so it is not waited for; it owns call from here on.
	go fc.distribute()

	started.Wait()
	fc.sendHeader()
	ended.Wait()
	ss.SetTrailer(metadata.Pairs(
		FanOutBackendsTrailer, strconv.Itoa(len(fc.backends)),
		FanOutFailedTrailer, strconv.Itoa(int(fc.failed.Load())),
	))

	if err := ss.Context().Err(); err != nil {
		return status.FromContextError(err).Err()
	}
	if dl, ok := ss.Context().Deadline(); ok && !time.Now().Before(dl) {
		// The backends got the same deadline and their timers may fire
		// before this call's own: the call is over for the same reason.
		return status.Error(codes.DeadlineExceeded, context.DeadlineExceeded.Error())
	}
	if err := fc.recvErr.Load(); err != nil {
		return statusOf(*err)
	}
	if fc.merge {
		return fc.sendMerged()
	}
	fc.mu.Lock()
	defer fc.mu.Unlock()
	if fc.sendErr != nil {
		return statusOf(fc.sendErr)
	}
	return nil
}

// sendMerged sends the one response the Responder merges from every
// backend's results.
func (fc *fanCall) sendMerged() error {
	var all [][]byte
	for _, b := range fc.backends {
		all = append(all, b.results...)
	}
	merged, err := fc.resp.Merge(all)
	if err != nil {
		return status.Error(codes.Internal, "proxy: merging the results: "+err.Error())
	}
	if err := fc.send(&Frame{data: mem.BufferSlice{mem.SliceBuffer(merged)}}); err != nil {
		return statusOf(err)
	}
	return nil
}

// distribute reads the client's messages and queues each for every backend
// still taking requests, sharing its buffers by reference count. It closes
// every queue when the client half-closes or the call ends.
func (fc *fanCall) distribute() {
	defer fc.call.release()
	defer func() {
		for _, b := range fc.backends {
			close(b.reqs)
		}
	}()
	live := make([]*fanBackend, 0, len(fc.backends))
	for {
		f, err := fc.call.recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				fc.halfClosed.Store(true)
			} else if fc.call.stream.Context().Err() == nil {
				// The client's stream failed without ending the call
				// (a message too large, say): end it with that error.
				fc.recvErr.Store(&err)
				fc.cancel()
			}
			return
		}
		live = live[:0]
		for _, b := range fc.backends {
			select {
			case <-b.stopped:
			default:
				live = append(live, b)
			}
		}
		if len(live) == 0 {
			f.free()
			continue
		}
		// Every backend frees its own reference; take them all before
		// handing the first one out.
		data := f.data // f is the first backend's to free, and clear
		for range len(live) - 1 {
			data.Ref()
		}
		for i, b := range live {
			share := f
			if i > 0 {
				share = &Frame{data: data}
			}
			select {
			case b.reqs <- share:
			case <-b.stopped:
				share.free()
			}
		}
	}
}

// sendRequests sends the messages queued for b to its backend, in order,
// and half-closes when the client did. Once it stops taking requests it
// frees whatever the distributor still queues for b.
func (fc *fanCall) sendRequests(b *fanBackend) {
	defer func() {
		close(b.stopped)
		for f := range b.reqs {
			f.free()
		}
	}()
	<-b.ready
	if b.cs == nil {
		return
	}
	for {
		select {
		case f, ok := <-b.reqs:
			if !ok {
				if fc.halfClosed.Load() {
					_ = b.cs.CloseSend()
				}
				return
			}
			err := b.cs.SendMsg(f)
			f.free()
			if err != nil {
				// The backend's call is over; its status comes on the
				// response side.
				return
			}
		case <-b.ctx.Done():
			return
		}
	}
}

// relayResponses starts b's call and sends each of its response messages to
// the client with b's label appended, then, if b's call fails, one message
// holding only the label with the status; or, with a Responder, what it
// makes of them.
func (fc *fanCall) relayResponses(ctx context.Context, b *fanBackend, md metadata.MD, started *sync.WaitGroup) {
	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	b.ctx = bctx
	var err error
	if b.conn == nil {
		err = status.Errorf(codes.Unavailable, "proxy: no connection for backend %q", b.name)
	} else {
		desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
		b.cs, err = b.conn.NewStream(metadata.NewOutgoingContext(bctx, md), desc, fc.call.method, fc.callOpts...)
	}
	close(b.ready)
	started.Done()
	if err != nil {
		fc.sendFailure(b, err)
		return
	}
	if fc.resp != nil {
		fc.respond(b, cancel)
		return
	}

	// The label is the same for every message of b: encode it once and
	// append it to each message as one more buffer, without copying the
	// message's own buffers.
	label := mem.SliceBuffer(labelFor(fc.field, b.name, nil))
	for {
		f := new(Frame)
		if err := b.cs.RecvMsg(f); err != nil {
			if !errors.Is(err, io.EOF) {
				fc.sendFailure(b, err)
			}
			return
		}
		// The new slice owns f's references; the label's buffer is not
		// reference counted.
		data := make(mem.BufferSlice, len(f.data)+1)
		copy(data, f.data)
		data[len(f.data)] = label
		f.data = data
		err := fc.send(f)
		f.free()
		if err != nil {
			return
		}
	}
}

// respond relays b's results as the Responder makes them; cancel ends b's
// call.
func (fc *fanCall) respond(b *fanBackend, cancel context.CancelFunc) {
	backend := Backend{Name: b.name, Conn: b.conn}
	for {
		f := new(Frame)
		if err := b.cs.RecvMsg(f); err != nil {
			if !errors.Is(err, io.EOF) {
				fc.sendFailure(b, err)
			}
			return
		}
		// A copy the Responder may keep: it outlives the frame's pooled
		// buffers when results are merged.
		msg := f.data.Materialize()
		f.free()
		if fc.resp.Message != nil {
			out, err := fc.resp.Message(backend, fc.unary, msg)
			if err != nil {
				cancel()
				fc.reportFailure(b, status.New(codes.Internal, "proxy: responder: "+err.Error()))
				return
			}
			msg = out
		}
		if err := fc.deliver(b, msg); err != nil {
			return
		}
	}
}

// deliver sends msg, one of b's results as the Responder made it, or keeps
// it to merge; a nil msg is dropped.
func (fc *fanCall) deliver(b *fanBackend, msg []byte) error {
	if msg == nil {
		return nil
	}
	if fc.merge {
		b.results = append(b.results, msg)
		return nil
	}
	return fc.send(&Frame{data: mem.BufferSlice{mem.SliceBuffer(msg)}})
}

// sendFailure reports b's call ending with err.
func (fc *fanCall) sendFailure(b *fanBackend, err error) {
	fc.reportFailure(b, status.Convert(fc.opts.backendFailure(fc.call.stream.Context(), Backend{Name: b.name, Conn: b.conn}, err)))
}

// reportFailure counts b's failure with st and sends the message that
// reports it: the label, or what the Responder makes of it.
func (fc *fanCall) reportFailure(b *fanBackend, st *status.Status) {
	fc.failed.Add(1)
	if fc.resp == nil {
		f := &Frame{data: mem.BufferSlice{mem.SliceBuffer(labelFor(fc.field, b.name, st))}}
		_ = fc.send(f)
		return
	}
	if fc.resp.Failure != nil {
		_ = fc.deliver(b, fc.resp.Failure(Backend{Name: b.name, Conn: b.conn}, fc.unary, st))
	}
}

// sendHeader sends the proxy's own, empty, response headers unless a
// message already went with them.
func (fc *fanCall) sendHeader() {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	if fc.headerSent || fc.sendErr != nil {
		return
	}
	fc.headerSent = true
	if err := fc.call.stream.SendHeader(nil); err != nil {
		fc.sendErr = err
		fc.cancel()
	}
}

// send sends f to the client. A failure ends every backend's call, and
// the fanned-out call with it; later sends fail at once.
func (fc *fanCall) send(f *Frame) error {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	if fc.sendErr != nil {
		return fc.sendErr
	}
	fc.headerSent = true
	if err := fc.call.stream.SendMsg(f); err != nil {
		fc.sendErr = err
		fc.cancel()
	}
	return fc.sendErr
}
