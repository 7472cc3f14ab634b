package tunnel

import (
	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// sendMessage sends one encoded message as a message frame and
// continuation frames, built in fr, taking window credit before each chunk.
// Chunks are slices of the codec's buffers, each sent with the buffer it
// lies in, so that the frame codec can send it without a copy. It returns
// errDone if done closes while it waits for credit or for its turn to send.
func sendMessage[F any](s *sender[F], win *flowcontrol.SendWindow, done <-chan struct{}, fr dataFramer, data mem.BufferSlice, maxChunk int) error {
	defer fr.forget()
	size := data.Len()
	if size == 0 {
		return s.sendFrame(done, fr.first(0, nil, nil))
	}
	first := true
	for _, b := range data {
		rest := b.ReadOnlyData()
		for len(rest) > 0 {
			n, ok := win.Take(min(maxChunk, len(rest)), done)
			if !ok {
				return errDone
			}
			var f any
			if first {
				f = fr.first(uint32(size), rest[:n], b)
				first = false
			} else {
				f = fr.next(rest[:n], b)
			}
			if err := s.sendFrame(done, f); err != nil {
				return err
			}
			rest = rest[n:]
		}
	}
	return nil
}

// contiguous returns data as one slice, copying only when it is held in
// several buffers.
func contiguous(data mem.BufferSlice) []byte {
	if len(data) == 1 {
		return data[0].ReadOnlyData()
	}
	return data.Materialize()
}
