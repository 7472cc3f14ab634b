package tunnel

import (
	"errors"
	"sync/atomic"
)

// receiveFrames reads frames into f with recv (the outer stream's RecvMsg)
// and hands them to dispatch until the outer stream ends, which it reports
// as the tunnel's end (nil for a clean one). It also stops once done is
// closed, returning ended(): a reader running on a handler's goroutine must
// return as soon as it has control so that the outer stream ends. Every
// frame is a sign of life for ka. The message payload bytes read are added
// to received.
func receiveFrames[F receivedFrame](recv func(any) error, f F, ka *keepalive, dispatch func(F) error, done <-chan struct{}, ended func() error, received *atomic.Uint64) error {
	defer f.reset()
	for {
		f.reset()
		if err := recv(f); err != nil {
			return tunnelFailure(err)
		}
		ka.received()
		if n := f.payload().len; n > 0 {
			received.Add(uint64(n))
		}
		if err := dispatch(f); err != nil {
			if errors.Is(err, errPeerClosed) {
				return nil
			}
			return err
		}
		select {
		case <-done:
			return ended()
		default:
		}
	}
}
