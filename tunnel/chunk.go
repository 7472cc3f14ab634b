package tunnel

import (
	"sync"

	"google.golang.org/grpc/mem"
)

// piece is part of a received chunk: bytes still in a buffer that gRPC read
// them into, and a reference to that buffer (owner) which keeps it from
// going back to gRPC's pool. A piece whose owner is nil holds bytes of its
// own (a frame that protobuf decoded, or a test's).
type piece struct {
	data  []byte
	owner mem.Buffer
}

// free drops the piece's reference.
func (p piece) free() {
	if p.owner != nil {
		p.owner.Free()
	}
}

// ref takes a reference of the piece's own, for a holder that outlives the
// one it got the piece from.
func (p piece) ref() {
	if p.owner != nil {
		p.owner.Ref()
	}
}

// chunk is the data of one message or continuation frame as the frame codec
// decoded it: views of gRPC's receive buffers rather than a copy. A frame
// spans several buffers when it crossed HTTP/2 frames, so a chunk is a list.
// The reader owns the chunk of the frame it dispatches and frees it after;
// what keeps a piece longer (a message waiting to be read) takes a
// reference of its own.
type chunk struct {
	pieces []piece
	len    int
}

// add appends p, taking over its reference.
func (c *chunk) add(p piece) {
	if len(p.data) == 0 {
		p.free()
		return
	}
	c.pieces = append(c.pieces, p)
	c.len += len(p.data)
}

// free drops every reference and empties the chunk, keeping its list for
// the next frame.
func (c *chunk) free() {
	for i, p := range c.pieces {
		p.free()
		c.pieces[i] = piece{}
	}
	c.pieces = c.pieces[:0]
	c.len = 0
}

// lentPiece lends a piece to a codec as a mem.Buffer of its own: the codec
// may keep a reference (gRPC's codecs may, by contract), and the piece's
// owner is freed when the last one is dropped. A piece of few bytes is
// copied into room instead and its owner freed at once: a view of it would
// be too small for mem.NewBuffer to count its references (see roomSize).
// lentPiece is the buffer's pool, to hear of its release (as
// frameEncoding is), and goes back to lentPieces then.
type lentPiece struct {
	room  [roomSize]byte
	data  []byte
	owner mem.Buffer
	bufs  [1]mem.Buffer
}

var lentPieces = sync.Pool{New: func() any { return new(lentPiece) }}

// lend makes p a buffer slice for a codec, taking over p's reference.
func (p piece) lend() mem.BufferSlice {
	if p.owner == nil {
		return mem.BufferSlice{mem.SliceBuffer(p.data)}
	}
	l := lentPieces.Get().(*lentPiece)
	if len(p.data) <= roomSize {
		l.data = append(l.room[:0], p.data...)
		p.owner.Free()
	} else {
		l.data = p.data[:len(p.data):len(p.data)]
		l.owner = p.owner
	}
	l.bufs[0] = mem.NewBuffer(&l.data, l)
	return l.bufs[:]
}

// Get is never called by mem.NewBuffer; it draws a fresh slice for anyone
// who does.
func (l *lentPiece) Get(n int) *[]byte {
	b := make([]byte, n)
	return &b
}

// Put hears that the codec has released the piece.
func (l *lentPiece) Put(*[]byte) {
	if l.owner != nil {
		l.owner.Free()
	}
	l.data, l.owner, l.bufs = nil, nil, [1]mem.Buffer{}
	lentPieces.Put(l)
}
