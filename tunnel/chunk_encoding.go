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

// headRoom is the room for a data frame's head (all of its encoding but the
// chunk's bytes, 32 bytes at most). It is more than that, and more than
// gRPC's pooling threshold, because mem.NewBuffer counts the references of
// larger buffers only; a smaller one it returns as a plain slice, and its
// end would go unreported.
const headRoom = 1<<10 + 64

// chunkEncoding is the encoding of a data frame whose chunk is sent where it
// lies: the frame's head, written into headRoom, then the chunk's bytes,
// still in owner, the buffer the message's codec put them in. gRPC writes
// the two buffers after SendMsg has returned, so owner is referenced until
// it has released both. The encoding is the pool of the two buffers it
// makes (mem.NewBuffer gives a buffer's bytes back to its pool once the
// last reference is gone), which is how it learns that they are released;
// it then frees owner and goes back to chunkEncodings.
type chunkEncoding struct {
	room  [headRoom]byte
	head  []byte
	data  []byte
	owner mem.Buffer
	held  atomic.Int32 // of the two buffers, those not yet released
	bufs  [2]mem.Buffer
}

var chunkEncodings = sync.Pool{New: func() any { return new(chunkEncoding) }}

// encodeViewing encodes h, a message or continuation frame whose data lies
// in owner, as its head and a view of the data, referencing owner.
func encodeViewing(h *hotFrame, owner mem.Buffer) mem.BufferSlice {
	e := chunkEncodings.Get().(*chunkEncoding)
	e.head = h.appendTo(e.room[:0], false)
	e.data = h.data[:len(h.data):len(h.data)]
	owner.Ref()
	e.owner = owner
	e.held.Store(2)
	e.bufs = [2]mem.Buffer{mem.NewBuffer(&e.head, e), mem.NewBuffer(&e.data, e)}
	return e.bufs[:]
}

// Get is never called by mem.NewBuffer; it draws a fresh slice for anyone
// who does.
func (e *chunkEncoding) Get(n int) *[]byte {
	b := make([]byte, n)
	return &b
}

// Put hears that gRPC has released one of the two buffers.
func (e *chunkEncoding) Put(*[]byte) {
	if e.held.Add(-1) != 0 {
		return
	}
	e.owner.Free()
	e.owner, e.data, e.bufs = nil, nil, [2]mem.Buffer{}
	chunkEncodings.Put(e)
}
