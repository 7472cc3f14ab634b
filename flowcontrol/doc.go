// Package flowcontrol does the byte accounting behind grpctunnel's per-stream
// flow control, independent of any wire format.
//
// Each direction of each tunneled stream has a window: the number of bytes the
// sender may have in flight before the receiver acknowledges them. The sender
// holds a [SendWindow]; it takes credit before every chunk it sends and gets
// credit back from the receiver's window updates. The receiver holds a
// [RecvWindow]; it checks every chunk against what it granted, and grants more
// as the application consumes what arrived.
//
// A receiver decides how much to grant, so window growth is the receiver's
// business alone: [RecvWindow.SetLimit] changes the target window at any time
// (for example from a bandwidth-delay estimate) and the next grants follow it.
// A sender needs nothing but the updates.
//
// [Chunk] cuts a message held in several buffers into wire chunks without
// copying.
package flowcontrol

import "errors"

const (
	// DefaultWindow is the window a grpctunnel.v1 peer assumes when none is
	// configured: 64 KiB.
	DefaultWindow = 64 * 1024

	// MinWindow is the smallest window a RecvWindow grants; smaller limits
	// are raised to it so that progress never depends on tiny updates.
	MinWindow = 1024

	// MaxWindow is the largest window either side may hold, as in HTTP/2. A
	// peer that grants more has broken the protocol.
	MaxWindow = 1<<31 - 1

	// MaxChunk is the largest chunk a plain grpctunnel.v1 peer accepts.
	MaxChunk = 16 * 1024
)

var (
	// ErrOverrun reports that a peer sent more bytes than the window allowed.
	ErrOverrun = errors.New("flowcontrol: peer overran the receive window")

	// ErrOverflow reports that a peer's window updates would take a send
	// window past MaxWindow.
	ErrOverflow = errors.New("flowcontrol: window update overflows the send window")
)
