package tunnel

import (
	"math/bits"
	"sync"
)

// unclearedPool holds the buffers that the tunnel fills completely before
// anyone reads them: messages received in several chunks, gathered for the
// codec, and frames the frame codec encodes. Unlike gRPC's default pool it
// does not clear a buffer it hands out again: clearing a megabyte costs as
// much as copying it, and every byte is overwritten anyway.
var unclearedPool = &dirtyPool{}

// dirtyPool is a mem.BufferPool of power-of-two sized buffers that are
// reused without being cleared.
type dirtyPool struct {
	tiers [bits.UintSize]sync.Pool
}

func (p *dirtyPool) Get(length int) *[]byte {
	k := bits.Len(uint(max(length, 1) - 1))
	if b, ok := p.tiers[k].Get().(*[]byte); ok {
		*b = (*b)[:length]
		return b
	}
	b := make([]byte, length, 1<<k)
	return &b
}

func (p *dirtyPool) Put(b *[]byte) {
	c := cap(*b)
	if c == 0 || c&(c-1) != 0 {
		return // not one of ours
	}
	p.tiers[bits.Len(uint(c))-1].Put(b)
}
