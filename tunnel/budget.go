package tunnel

import (
	"sync/atomic"
)

// budget bounds the bytes one tunnel holds for its readers: chunks received
// and not yet consumed, across all its streams, partial messages included.
// Windows bound each stream; the budget bounds their sum, so that a peer
// cannot multiply its allowance by opening more streams.
type budget struct {
	used  atomic.Int64
	limit int64
}

// take reserves n bytes, or reports false if that would exceed the limit.
func (b *budget) take(n int) bool {
	if b.used.Add(int64(n)) > b.limit {
		b.used.Add(-int64(n))
		return false
	}
	return true
}

// release returns n bytes.
func (b *budget) release(n int) {
	if n > 0 {
		b.used.Add(-int64(n))
	}
}
