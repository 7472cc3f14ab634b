package flowcontrol

import (
	"sync/atomic"
	"time"
)

// Hint remembers how large the receive windows of one tunnel's streams have
// grown, so that a new stream starts where the last ones got to. Streams on a
// tunnel share one path, and so one bandwidth-delay product: without a hint
// every new stream, and every stream resuming after idle, would spend its
// first round trips relearning it. The memory fades after HintLifetime
// without growth, as paths change. The zero value is ready to use.
type Hint struct {
	size atomic.Int64
	at   atomic.Int64 // monotonic nanoseconds of the last record
}

// record notes that a window grew to limit.
func (h *Hint) record(limit int64) {
	h.at.Store(now())
	for {
		cur := h.size.Load()
		if limit <= cur || h.size.CompareAndSwap(cur, limit) {
			return
		}
	}
}

// HintLifetime is how long a Hint remembers a window size.
const HintLifetime = 30 * time.Second

// limit returns the remembered size, or 0 once it has faded.
func (h *Hint) limit() int64 {
	if time.Duration(now()-h.at.Load()) > HintLifetime {
		return 0
	}
	return h.size.Load()
}
