package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Mirror is a backend that gets a copy of every request of a mirrored call
// (a [Route] with Mirrors) while only the primary answers the client: what
// Gitaly's praefect calls a secondary [Destination]. A mirror's responses,
// headers and trailers are read and dropped.
type Mirror struct {
	// Backend is where the copies go. Its Name appears in the errors the
	// proxy reports about the mirror; it is not sent to the mirror.
	Backend
	// Metadata, if not nil, is sent to this mirror instead of the route's
	// Metadata, for a mirror that must be told something the primary is
	// not (which node it is in a replicated write, say), as a Gitaly
	// director does with each Destination's Ctx.
	Metadata metadata.MD
	// FirstMessage, if not nil, is sent to this mirror in place of the
	// client's first request message; the later ones go unchanged. It is
	// Gitaly's Destination.Msg: a director that rewrites the request for
	// a secondary (another repository path, say) reads the message with
	// [Call.Peek], copies and changes it, and sets the result here. An
	// empty, non-nil slice is sent as an empty message. If the client
	// sends no message at all, nothing replaces it. The proxy neither
	// changes nor keeps the slice after the call; the director must not
	// change it once returned.
	FirstMessage []byte
	// OnError decides what the mirror's failure does to the call: it gets
	// the mirror's status, or a [*MirrorLagError] if the proxy gave up on
	// the mirror, and returns nil to swallow the failure or an error to
	// fail the call with (see "Mirroring" in the package documentation
	// for when). It is Gitaly's Destination.ErrHandler. Nil swallows every
	// failure: a mirror is best effort unless its route says otherwise.
	//
	// As Gitaly's ErrHandler does, it gets the mirror's status as the
	// mirror (or the connection to it) gave it: [WithBackendErrors] does
	// not rewrite it, since that option shapes what the client sees, and
	// OnError, the director's own code, needs the real failure to log it
	// or to schedule a repair. What OnError returns reaches the client as
	// it is, as a Director's error does: an OnError that returns a status
	// naming internal addresses rewrites it first.
	OnError func(err error) error
}

// MirrorLagError is what a mirror's OnError gets when the proxy gave up on
// the mirror because it fell behind the primary: its backlog of requests
// outgrew the buffer ([WithMirrorBuffer]), or it was still running when
// the wait after the primary's call ran out ([WithMirrorWait]). The proxy
// cancels such a mirror's call, so that it never holds up the primary's
// answer. As a gRPC status its code is ResourceExhausted for the former,
// DeadlineExceeded for the latter.
type MirrorLagError struct {
	// Mirror is the Name of the mirror's Backend.
	Mirror string
	// Messages and Bytes are the request messages the proxy held for the
	// mirror that it had not taken yet (counting, for a backlog that
	// outgrew the buffer, the one that did not fit), and their size: how
	// far behind the primary the mirror was.
	Messages int
	Bytes    int
	// Late is set when the mirror was given up on because it was still
	// running Waited after the primary's call ended.
	Late   bool
	Waited time.Duration
}

func (e *MirrorLagError) Error() string {
	if e.Late {
		return fmt.Sprintf("proxy: mirror %q fell behind the primary: still running %v after the primary's call ended, with %d request messages (%d bytes) not yet taken",
			e.Mirror, e.Waited, e.Messages, e.Bytes)
	}
	return fmt.Sprintf("proxy: mirror %q fell behind the primary by %d request messages (%d bytes)", e.Mirror, e.Messages, e.Bytes)
}

// GRPCStatus makes the error a gRPC status, so that an OnError that
// returns it fails the call with a meaningful code.
func (e *MirrorLagError) GRPCStatus() *status.Status {
	code := codes.ResourceExhausted
	if e.Late {
		code = codes.DeadlineExceeded
	}
	return status.New(code, e.Error())
}

const (
	// DefaultMirrorBuffer is how many bytes of requests a mirror may lag
	// behind the primary before the proxy gives up on it, unless
	// [WithMirrorBuffer] says otherwise: as much as one message of gRPC's
	// default maximum size, so that a mirror as fast as the primary is
	// never given up on for one large message.
	DefaultMirrorBuffer = 4 << 20
	// DefaultMirrorWait is how long the status of a mirrored call waits
	// for the mirrors after the primary's call ended, unless
	// [WithMirrorWait] says otherwise: long enough for a mirror doing the
	// same work as the primary, a little later, to finish it, short
	// enough that a stuck mirror is not mistaken for a slow primary.
	DefaultMirrorWait = time.Second

	// mirrorMsgCost is what each queued message counts on top of its
	// size, so that a flood of empty messages is bounded too.
	mirrorMsgCost = 64
)

// mirrorOptions are the handler's settings for mirrored calls; zero
// values mean the defaults.
type mirrorOptions struct {
	buffer    int
	wait      time.Duration
	bufferSet bool
	waitSet   bool
}

// WithMirrorBuffer sets how many bytes of request messages the proxy holds
// for each mirror of a mirrored call that has not taken them yet (plus a
// few bytes a message); default [DefaultMirrorBuffer]. Requests go at the
// primary's pace, so a mirror slower than that falls behind: once its
// backlog would pass n, the proxy gives up on it, cancels its call and
// reports a [*MirrorLagError] to its OnError. One message is always
// accepted when the backlog is empty, whatever its size. A larger buffer
// rides out longer hiccups of a mirror at the cost of memory per call.
func WithMirrorBuffer(n int) Option {
	return func(o *options) { o.mirror.buffer, o.mirror.bufferSet = max(n, 0), true }
}

// WithMirrorWait sets how long the status of a mirrored call waits for its
// mirrors once the primary's call has ended; default [DefaultMirrorWait].
// The primary's headers, messages and trailers never wait for a mirror,
// but the status does, since a mirror's OnError may fail the call; a
// mirror still running after d is given up on, cancelled, and reported as
// a [*MirrorLagError]. A mirror that has not yet taken all the requests
// the primary took when the primary's call ends is given up on at once,
// without waiting. Zero gives up on every mirror still running when the
// primary's call ends; a deployment replicating writes, where a mirror's
// result matters, sets as long as a mirror may legitimately trail.
func WithMirrorWait(d time.Duration) Option {
	return func(o *options) { o.mirror.wait, o.mirror.waitSet = max(d, 0), true }
}

func (mo mirrorOptions) bufferSize() int {
	if !mo.bufferSet {
		return DefaultMirrorBuffer
	}
	return mo.buffer
}

func (mo mirrorOptions) waitTime() time.Duration {
	if !mo.waitSet {
		return DefaultMirrorWait
	}
	return mo.wait
}

// mirrored reports whether r is a mirrored route.
func (r *Route) mirrored() bool { return len(r.Mirrors) > 0 || r.Finalize != nil }

// mirrorCall is one mirror of a mirrored call.
type mirrorCall struct {
	Mirror
	limit  int
	ctx    context.Context
	cancel context.CancelFunc
	cs     grpc.ClientStream // nil if the call could not start
	// wake tells the sender that the queue changed.
	wake chan struct{}
	// ended is closed once the mirror's call is over (its status read).
	ended chan struct{}

	mu sync.Mutex
	// queue holds the requests the mirror has yet to take; msgs, bytes
	// and cost count them and the one being sent.
	queue             []*Frame
	msgs, bytes, cost int
	// closed: the distributor sends no more; halfClose: because the
	// client half-closed. stopped: the sender takes no more.
	closed, halfClose, stopped bool
	// err is the mirror's failure, the first one seen.
	err error
}

// fail gives up on m with err, unless m already failed, and cancels its
// call. Whatever is queued is freed.
func (m *mirrorCall) fail(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failLocked(err)
}

func (m *mirrorCall) failLocked(err error) {
	if m.err == nil {
		m.err = err
	}
	m.cancel()
	m.freeQueueLocked()
}

func (m *mirrorCall) freeQueueLocked() {
	for i, f := range m.queue {
		f.free()
		m.queue[i] = nil
	}
	m.queue = nil
}

// lag describes how far behind m is; late if the wait after the primary
// ran out.
func (m *mirrorCall) lag(late bool, waited time.Duration) *MirrorLagError {
	return &MirrorLagError{Mirror: m.Name, Messages: m.msgs, Bytes: m.bytes, Late: late, Waited: waited}
}

// offer queues f, which m owns from here on, for the mirror, or gives up
// on the mirror if it is too far behind.
func (m *mirrorCall) offer(f *Frame) {
	m.mu.Lock()
	if m.err != nil || m.closed || m.stopped {
		m.mu.Unlock()
		f.free()
		return
	}
	n := f.Len()
	if m.msgs > 0 && m.cost+n+mirrorMsgCost > m.limit {
		e := m.lag(false, 0)
		e.Messages++
		e.Bytes += n
		m.failLocked(e)
		m.mu.Unlock()
		f.free()
		return
	}
	m.queue = append(m.queue, f)
	m.msgs++
	m.bytes += n
	m.cost += n + mirrorMsgCost
	m.mu.Unlock()
	m.signal()
}

// close tells the mirror that no more requests come; halfClose if the
// client half-closed.
func (m *mirrorCall) close(halfClose bool) {
	m.mu.Lock()
	if !m.closed {
		m.closed, m.halfClose = true, halfClose
	}
	m.mu.Unlock()
	m.signal()
}

func (m *mirrorCall) signal() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// send sends the queued requests to the mirror, in order, then
// half-closes if the client did. If the requests ended otherwise (the
// primary's call ended before the client half-closed), the mirror's
// requests are incomplete and its call is given up on.
func (m *mirrorCall) send() {
	defer func() {
		m.mu.Lock()
		m.stopped = true
		m.freeQueueLocked()
		m.msgs, m.bytes, m.cost = 0, 0, 0
		m.mu.Unlock()
	}()
	for {
		m.mu.Lock()
		if m.err != nil || m.ctx.Err() != nil {
			m.mu.Unlock()
			return
		}
		if len(m.queue) == 0 {
			if m.closed {
				if m.halfClose {
					m.mu.Unlock()
					_ = m.cs.CloseSend()
					return
				}
				select {
				case <-m.ended:
				default:
					m.failLocked(status.Errorf(codes.Canceled,
						"proxy: mirror %q cancelled: the primary's call ended before the client finished sending", m.Name))
				}
				m.mu.Unlock()
				return
			}
			m.mu.Unlock()
			select {
			case <-m.wake:
			case <-m.ctx.Done():
			}
			continue
		}
		f := m.queue[0]
		m.queue[0] = nil
		m.queue = m.queue[1:]
		m.mu.Unlock()

		n := f.Len()
		err := m.cs.SendMsg(f)
		f.free()
		m.mu.Lock()
		m.msgs--
		m.bytes -= n
		m.cost -= n + mirrorMsgCost
		m.mu.Unlock()
		if err != nil {
			return // the mirror's status comes on the response side
		}
	}
}

// receive reads and drops the mirror's responses until its call ends, and
// records its failure as the mirror gave it: WithBackendErrors rewrites
// what the client sees, and a mirror's failure reaches OnError, the
// director's own code, which needs the real one (see OnError).
func (m *mirrorCall) receive() {
	defer close(m.ended)
	defer m.cancel() // the sender stops too
	f := new(Frame)
	for {
		err := m.cs.RecvMsg(f)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				m.fail(statusOf(err))
			}
			return
		}
		f.free()
	}
}

// mirrorTask is one goroutine's work in a mirrored call, run by the
// handler's pool of workers (internal/workers), as a forwarded call's
// requests are: reading the client and sending to a backend go as deep as
// a pump does, through a tunnel deeper still, and a worker keeps the stack
// an earlier call grew. Each task ends with the call: a mirror's receive
// when its call ends (the handler waits for that), its send once the
// mirror's context is cancelled at the latest (the handler cancels it on
// return), and distribute when gRPC ends the client's call, as a pump
// does. So none holds a worker past the call. Exactly one field is set.
type mirrorTask struct {
	distribute    *mirroredCall
	send, receive *mirrorCall
}

func (t mirrorTask) run() {
	switch {
	case t.distribute != nil:
		t.distribute.distribute()
	case t.send != nil:
		t.send.send()
	default:
		t.receive.receive()
	}
}

// mirroredCall is a call running on a primary and its mirrors.
type mirroredCall struct {
	call    *Call
	primary grpc.ClientStream
	mirrors []*mirrorCall
	// cancel ends the primary's and the mirrors' calls.
	cancel context.CancelFunc
	// recvErr is what reading the client returned when it was neither a
	// half-close nor the end of the call.
	recvErr atomic.Pointer[error]
}

// distribute reads the client's requests and sends each to the primary,
// at the primary's pace, then queues it for every mirror, sharing its
// buffers. The mirrors get what the primary got: nothing after a send to
// the primary fails.
func (mc *mirroredCall) distribute() {
	defer mc.call.release()
	shares := make([]*Frame, len(mc.mirrors))
	first := true
	for {
		f, err := mc.call.recv()
		if err != nil {
			eof := errors.Is(err, io.EOF)
			if eof {
				_ = mc.primary.CloseSend()
			} else if mc.call.stream.Context().Err() == nil {
				// The client's stream failed without ending the call (a
				// message too large, say): end it with that error, as
				// the primary would otherwise wait for requests forever.
				mc.recvErr.Store(&err)
				mc.cancel()
			}
			for _, m := range mc.mirrors {
				m.close(eof)
			}
			return
		}
		// The primary frees f once sent: take the mirrors' references
		// first.
		for i, m := range mc.mirrors {
			if first && m.FirstMessage != nil {
				// FrameOf takes the slice over without copying it; the
				// director promised not to change it, and freeing a
				// frame over a plain slice frees nothing, so every
				// share may wrap the same bytes.
				shares[i] = FrameOf(m.FirstMessage)
				continue
			}
			f.data.Ref()
			shares[i] = &Frame{data: f.data}
		}
		first = false
		err = mc.primary.SendMsg(f)
		f.free()
		for i, m := range mc.mirrors {
			if err != nil {
				shares[i].free()
			} else {
				m.offer(shares[i])
			}
			shares[i] = nil
		}
		if err != nil {
			for _, m := range mc.mirrors {
				m.close(false)
			}
			return
		}
	}
}

// mirror runs call on route's primary and mirrors, as "Mirroring" in the
// package documentation describes. It owns call.
func mirror(call *Call, route Route, o *options) (err error) {
	ss := call.stream
	callCtx := ss.Context()
	if route.Finalize != nil {
		defer func() {
			if ferr := route.Finalize(callCtx); ferr != nil && err == nil {
				err = statusOf(ferr)
			}
		}()
	}
	// A fan-out answers with every backend's results, a mirrored call with
	// the primary's alone: the two cannot both hold, and picking one
	// silently would hide the director's mistake until a client noticed
	// the missing (or extra) answers.
	if route.FanOut || len(route.Backends) > 1 {
		call.release()
		return status.Error(codes.Internal, "proxy: a route cannot both fan out and mirror")
	}
	if len(route.Backends) == 0 {
		call.release()
		return status.Errorf(codes.Unavailable, "proxy: no backend for %s", call.method)
	}
	primary := route.Backends[0]
	if primary.Conn == nil {
		call.release()
		return status.Errorf(codes.Unavailable, "proxy: no backend for %s", call.method)
	}
	ctx, cancel := context.WithCancel(callCtx)
	defer cancel()
	cs, err := primary.Conn.NewStream(metadata.NewOutgoingContext(ctx, route.Metadata), bidiDesc, call.method, o.callOpts...)
	if err != nil {
		call.release()
		return o.backendFailure(callCtx, primary, err)
	}

	mc := &mirroredCall{call: call, primary: cs, cancel: cancel}
	limit := o.mirror.bufferSize()
	for _, mr := range route.Mirrors {
		m := &mirrorCall{Mirror: mr, limit: limit, wake: make(chan struct{}, 1), ended: make(chan struct{})}
		m.ctx, m.cancel = context.WithCancel(ctx)
		mc.mirrors = append(mc.mirrors, m)
		md := route.Metadata
		if mr.Metadata != nil {
			md = mr.Metadata
		}
		var err error
		if mr.Conn == nil {
			err = status.Errorf(codes.Unavailable, "proxy: no connection for mirror %q", mr.Name)
		} else {
			m.cs, err = mr.Conn.NewStream(metadata.NewOutgoingContext(m.ctx, md), bidiDesc, call.method, o.callOpts...)
			if err != nil {
				err = statusOf(err) // not rewritten, as in receive
			}
		}
		if err != nil {
			m.fail(err)
			m.stopped = true
			close(m.ended)
			continue
		}
		o.mirrorTasks.Go(mirrorTask{send: m})
		o.mirrorTasks.Go(mirrorTask{receive: m})
	}
	// Reading the client may outlive the handler (only the call's end
	// unblocks it), so it is not waited for; it owns call from here on.
	o.mirrorTasks.Go(mirrorTask{distribute: mc})

	backendErr, callerErr := pumpResponses(ss, cs)

	// The primary has answered; the status waits a bounded time for the
	// mirrors. A mirror with requests still queued is not given up on at
	// once: its sender may just not have run yet.
	wait := o.mirror.waitTime()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	timedOut := false
	for _, m := range mc.mirrors {
		if !timedOut {
			select {
			case <-m.ended:
				continue
			case <-timer.C:
				timedOut = true
				for _, m := range mc.mirrors {
					m.mu.Lock()
					select {
					case <-m.ended:
					default:
						m.failLocked(m.lag(true, wait))
					}
					m.mu.Unlock()
				}
			}
		}
		<-m.ended // cancelled, it ends at once
	}

	switch {
	case callCtx.Err() != nil:
		err = status.FromContextError(callCtx.Err()).Err()
	case mc.recvErr.Load() != nil:
		err = statusOf(*mc.recvErr.Load())
	case backendErr != nil:
		err = o.backendFailure(callCtx, primary, backendErr)
	case callerErr != nil:
		err = statusOf(callerErr)
	}
	// Every mirror's handler is told, even when the call fails anyway, so
	// that each can log or count its mirror's failure.
	for _, m := range mc.mirrors {
		m.mu.Lock()
		merr := m.err
		m.mu.Unlock()
		if merr == nil || m.OnError == nil {
			continue
		}
		if r := m.OnError(merr); r != nil && err == nil {
			err = statusOf(r)
		}
	}
	return err
}
