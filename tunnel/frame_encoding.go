package tunnel

import (
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/mem"
)

// minViewChunk is the smallest chunk that the frame codec sends where it
// lies instead of copying it into the frame's encoding: below it, copying
// costs less than the references that keep the chunk's buffer alive until
// gRPC has written it.
const minViewChunk = 16 << 10

// roomSize is the room a frameEncoding has for bytes of its own: a whole
// control frame or small message frame, or the head of a larger one. It is
// more than gRPC's pooling threshold (1 KiB) because mem.NewBuffer counts
// the references of larger buffers only; a smaller one it returns as a
// plain slice, whose end gRPC would not report. (Were the threshold higher,
// the encodings would simply not be reused, and the garbage collector would
// keep the chunks alive instead of the references.)
const roomSize = 1<<10 + 64

// frameEncoding is what the frame codec hands gRPC for one frame: one
// buffer, the whole encoding, written into room or, when it does not fit,
// into a buffer drawn from unclearedPool; or two, when the frame's chunk is
// sent where it lies, in owner, the buffer the message's codec put it in:
// the head written into room, then a view of the chunk. gRPC writes the
// buffers after SendMsg has returned and frees them once written. The
// encoding is their pool (mem.NewBuffer gives a buffer's bytes back to its
// pool once the last reference is gone), which is how it learns that they
// are released: it then frees owner, gives the drawn buffer back, and goes
// back to frameEncodings. Frames thus cost no allocation, whatever their
// size.
type frameEncoding struct {
	room  [roomSize]byte
	head  []byte  // in room
	drawn *[]byte // from unclearedPool
	view  []byte  // in owner
	owner mem.Buffer
	held  atomic.Int32 // buffers not yet released
	bufs  [2]mem.Buffer
}

var frameEncodings = sync.Pool{New: func() any { return new(frameEncoding) }}

// encodeFrame encodes h, whose encoding is n bytes long; owner, if not nil,
// is the buffer that h's data lies in.
func encodeFrame(h *hotFrame, n int, owner mem.Buffer) mem.BufferSlice {
	e := frameEncodings.Get().(*frameEncoding)
	switch {
	case owner != nil && len(h.data) >= minViewChunk:
		e.head = h.appendTo(e.room[:0], false)
		e.view = h.data[:len(h.data):len(h.data)]
		owner.Ref()
		e.owner = owner
		e.held.Store(2)
		e.bufs = [2]mem.Buffer{mem.NewBuffer(&e.head, e), mem.NewBuffer(&e.view, e)}
		return e.bufs[:]
	case n <= roomSize:
		e.head = h.appendTo(e.room[:0], true)
		e.held.Store(1)
		e.bufs[0] = mem.NewBuffer(&e.head, e)
	default:
		e.drawn = unclearedPool.Get(n)
		*e.drawn = h.appendTo((*e.drawn)[:0], true)
		e.held.Store(1)
		e.bufs[0] = mem.NewBuffer(e.drawn, e)
	}
	return e.bufs[:1]
}

// Get is never called by mem.NewBuffer; it draws a fresh slice for anyone
// who does.
func (e *frameEncoding) Get(n int) *[]byte {
	b := make([]byte, n)
	return &b
}

// Put hears that gRPC has released one of the encoding's buffers.
func (e *frameEncoding) Put(*[]byte) {
	if e.held.Add(-1) != 0 {
		return
	}
	if e.owner != nil {
		e.owner.Free()
	}
	if e.drawn != nil {
		unclearedPool.Put(e.drawn)
	}
	e.head, e.drawn, e.view, e.owner, e.bufs = nil, nil, nil, nil, [2]mem.Buffer{}
	frameEncodings.Put(e)
}
