package flowcontrol

// Chunk returns the next chunk of a message held in bufs: at most max bytes
// taken from the front of the first non-empty buffer, never spanning two
// buffers, so no byte is copied. rest is what remains to send. When bufs holds
// no bytes, chunk is nil.
func Chunk(bufs [][]byte, max int) (chunk []byte, rest [][]byte) {
	for len(bufs) > 0 && len(bufs[0]) == 0 {
		bufs = bufs[1:]
	}
	if len(bufs) == 0 {
		return nil, nil
	}
	b := bufs[0]
	if len(b) <= max {
		return b, bufs[1:]
	}
	// Shorten the first buffer in a copy of the slice header array only when
	// needed; callers own bufs, so rewriting its first element is fine.
	bufs[0] = b[max:]
	return b[:max], bufs
}
