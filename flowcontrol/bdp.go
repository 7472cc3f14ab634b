package flowcontrol

import "sync/atomic"

// bdpEstimator measures how many bytes a stream receives in one round trip,
// the bandwidth-delay product, without any frame of its own: the plain
// protocol has no ping. A window update serves instead. Bytes beyond the
// offset the peer could reach before an update can only have been sent after
// that update arrived, so the first of them comes back one round trip (or
// more, if the sender was not waiting) after the update left. From that
// moment the estimator counts what arrives during one more round trip; that
// count is the sample.
//
// One probe runs at a time. A grant may come from either goroutine that
// grants (the reader, widening the window for a large message, and the
// consumer, as it consumes), so starting a probe is claimed: the granter
// that moves probeAt from 0 to probeClaimed alone writes probeTime, then
// publishes the probe's offset. The reader runs the rest (received) and
// sees a probe only once its offset is published, so offset and time always
// belong to the same grant; the sampling state is the reader's alone.
type bdpEstimator struct {
	probeAt   atomic.Int64 // offset the peer could reach before the probe's update; 0 when none, probeClaimed while one starts
	probeTime atomic.Int64 // when that update was granted

	// Reader-owned.
	sampling    bool
	sampleEnd   int64 // when the sample's round trip is over
	sampleBytes int64
}

// probeClaimed marks a probe being started by one granter; offsets are
// positive, so it is never a probe's offset.
const probeClaimed = -1

// granted notes that credit beyond offset g is about to be granted; if no
// probe is running, that update becomes one. It is safe to call from any
// goroutine.
func (b *bdpEstimator) granted(g int64) {
	if b.probeAt.Load() != 0 || !b.probeAt.CompareAndSwap(0, probeClaimed) {
		return
	}
	b.probeTime.Store(now())
	b.probeAt.Store(max(g, 1))
}

// received notes that n bytes arrived, bringing the stream to offset r. It
// returns a completed sample, or 0. Only the reader calls it.
func (b *bdpEstimator) received(r int64, n int) int64 {
	t := now()
	if b.sampling {
		b.sampleBytes += int64(n)
		if t < b.sampleEnd {
			return 0
		}
		b.sampling = false
		b.probeAt.Store(0)
		return b.sampleBytes
	}
	p := b.probeAt.Load()
	if p <= 0 || r <= p {
		return 0
	}
	rtt := t - b.probeTime.Load()
	b.sampling = true
	b.sampleEnd = t + rtt
	b.sampleBytes = r - p
	return 0
}
