package tunnel

import (
	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// sendMessage sends one encoded message as a message frame and continuation
// frames, taking window credit before each chunk. Chunks are slices of the
// codec's buffers; the only copy is the outer stream's own encoding. It
// returns errDone if done closes while it waits for credit or for its turn
// to send.
func sendMessage[F any, FR framer[F]](s *sender[F], win *flowcontrol.SendWindow, done <-chan struct{}, fr FR, data mem.BufferSlice, maxChunk int) error {
	size := data.Len()
	if size == 0 {
		return s.Send(done, fr.message(0, nil))
	}
	var small [4][]byte
	bufs := small[:0]
	for _, b := range data {
		bufs = append(bufs, b.ReadOnlyData())
	}
	first := true
	for len(bufs) > 0 {
		for len(bufs) > 0 && len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
		if len(bufs) == 0 {
			break
		}
		n, ok := win.Take(min(maxChunk, len(bufs[0])), done)
		if !ok {
			return errDone
		}
		var chunk []byte
		chunk, bufs = flowcontrol.Chunk(bufs, n)
		var f F
		if first {
			f = fr.message(uint32(size), chunk)
			first = false
		} else {
			f = fr.more(chunk)
		}
		if err := s.Send(done, f); err != nil {
			return err
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
