package tunnel

import (
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
)

// These tests play hostile and broken peers against both ends of a tunnel,
// frame by frame: against the tunnel server (a TunnelServiceHandler driven by
// a raw network client, and a ReverseTunnelServer driven by a fake network
// server) and against the tunnel client (a NewChannel client driven by a fake
// network server, and a handler's reverse tunnel driven by a raw network
// client). Each misbehaviour must end as PROTOCOL.md's Errors table says:
// the stream or the tunnel, with a clear status; never a panic, a hang, a
// leaked goroutine (goleak runs in TestMain) or memory growing without bound,
// and never harm to another tunnel, which each test checks with a bystander.
// protocol_test.go already covers part of the tunnel server's side; what is
// there is not repeated here.
//
// The tests are filed by the end they attack: hostile_server_test.go (a
// handler's forward tunnel server), hostile_client_test.go (a NewChannel
// client) and hostile_reverse_test.go (both ends of a reverse tunnel). The
// peers they play are in rawpeer_test.go, their frames in
// frames_builders_test.go; this file holds what they share.

// hosHold is a probe whose streaming handler neither reads nor sends: it
// waits until its call ends. It counts its handlers in and out, so that a
// test sees every handler a hostile peer started return. Its unary method
// echoes.
type hosHold struct{ started, exited atomic.Int64 }

func (h *hosHold) probe() *probe {
	return &probe{stream: func(ss grpc.ServerStream) error {
		h.started.Add(1)
		defer h.exited.Add(1)
		<-ss.Context().Done()
		return nil
	}}
}

// hosBystander makes a call on another tunnel of the same server: the
// hostile peer must not have harmed it.
func hosBystander(t *testing.T, cc grpc.ClientConnInterface) {
	t.Helper()
	out, err := unary(peerContext(t), cc, []byte("bystander"))
	if err != nil || string(out) != "bystander" {
		t.Fatalf("a bystander tunnel was harmed: %q, %v", out, err)
	}
}

// hosQueued is how many frames wait in a sender's queue.
func hosQueued[F any](s *sender[F]) int {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	return len(s.queue)
}

// hosMaxQueued is the bound PROTOCOL.md sets on the frames an end queues for
// a peer that does not read them (Go's HTTP/2 server draws the same line).
const hosMaxQueued = 10000

// hosFlood sends frames with send, up to count or the first error, and
// reports the outcome on the returned channel.
func hosFlood(count int, send func(i int) error) chan error {
	sent := make(chan error, 1)
	go func() {
		for i := 1; i <= count; i++ {
			if err := send(i); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	return sent
}

// hosWatchQueue watches what an end queues for a peer that floods it and
// never reads: the queue never holds more than hosMaxQueued frames, and the
// end gives the tunnel up (done closes) long before a flood of many more
// frames than that is over.
func hosWatchQueue(t *testing.T, queued func() int, done <-chan struct{}) {
	t.Helper()
	waitFor(t, func() bool {
		if n := queued(); n > hosMaxQueued {
			t.Fatalf("%d frames queued for a peer that does not read", n)
		}
		select {
		case <-done:
			return true
		default:
			return false
		}
	})
}
