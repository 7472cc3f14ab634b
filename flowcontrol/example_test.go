package flowcontrol_test

import (
	"fmt"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// The sender's side of one stream: credit is taken before every chunk, runs
// out, and comes back with the peer's window update.
func ExampleSendWindow() {
	// The peer announced a 16-byte window when the stream opened.
	w := flowcontrol.NewSendWindow(16)

	// A small message goes out in one frame, together with the frames around
	// it, only if the window covers all of it; TryTake never waits.
	fmt.Println("12-byte request whole:", w.TryTake(12))

	// A larger message goes chunk by chunk. Take hands out what there is, so
	// this chunk is cut to the 4 bytes left.
	n, _ := w.Take(10, nil)
	fmt.Println("took:", n)

	// The window is exhausted: TryTake refuses at once...
	fmt.Println("6 more whole:", w.TryTake(6))

	// ...and Take waits for credit. The sender waits in its own goroutine
	// while the tunnel's reader applies the peer's window update with Add.
	took := make(chan int)
	go func() {
		n, _ := w.Take(6, nil)
		took <- n
	}()
	if err := w.Add(16); err != nil { // the peer consumed the first 16 bytes
		fmt.Println(err)
	}
	fmt.Println("took after the update:", <-took)
	fmt.Println("available:", w.Available())

	// Output:
	// 12-byte request whole: true
	// took: 4
	// 6 more whole: false
	// took after the update: 6
	// available: 10
}

// A stream that ends while its sender waits for credit: Take gives up when
// done closes, so the send fails instead of hanging.
func ExampleSendWindow_Take() {
	w := flowcontrol.NewSendWindow(0) // the peer has granted nothing yet
	done := make(chan struct{})       // closed when the stream is cancelled

	result := make(chan string)
	go func() {
		n, ok := w.Take(100, done)
		result <- fmt.Sprint(n, ok)
	}()
	close(done)
	fmt.Println(<-result)

	// Output:
	// 0 false
}

// The receiver's side of one stream: every arriving chunk is checked against
// what was granted, and consumption earns the peer new credit.
func ExampleRecvWindow() {
	// This side announced a 4096-byte window and keeps about that much
	// outstanding.
	w := flowcontrol.NewRecvWindow(4096, 4096)

	// The reader goroutine records each chunk; the peer may fill the whole
	// window without waiting.
	fmt.Println(w.Receive(4096))
	fmt.Println("buffered:", w.Buffered())

	// As the application takes messages, Consume says how much credit to send
	// back in a window update. Updates are batched: none until a quarter of
	// the window is free, then everything consumed so far.
	fmt.Println("update:", w.Consume(1000))
	fmt.Println("update:", w.Consume(100))

	// The peer may send those 1100 bytes and no more. A peer that overruns
	// the window has broken the protocol, and the tunnel fails the stream.
	fmt.Println(w.Receive(1100))
	fmt.Println(w.Receive(1))

	// Output:
	// <nil>
	// buffered: 4096
	// update: 0
	// update: 1100
	// <nil>
	// flowcontrol: peer overran the receive window
}

// A message larger than the window: the application waits for the whole
// message before consuming any of it, so the window must admit all of it.
func ExampleRecvWindow_BeginMessage() {
	w := flowcontrol.NewRecvWindow(1024, 1024)
	fmt.Println(w.Receive(512)) // a first, small message

	// The next message's first frame declares 10000 bytes. The tunnel sends
	// the returned credit at once, so the peer can send up to offset
	// 512+10000 and the message can complete.
	fmt.Println("extra credit:", w.BeginMessage(10000))
	fmt.Println(w.Receive(10000))

	// Output:
	// <nil>
	// extra credit: 9488
	// <nil>
}

// The receiver alone decides how large the window is; the sender only sees
// the updates.
func ExampleRecvWindow_SetLimit() {
	w := flowcontrol.NewRecvWindow(1024, 1024)

	// Grow the window, say from an estimate of the link's bandwidth-delay
	// product. Grant tells the peer now rather than at the next Consume.
	w.SetLimit(8192)
	fmt.Println("limit:", w.Limit(), "grant:", w.Grant())

	// Shrinking is clamped to MinWindow and never takes back credit the peer
	// already holds; it only slows later grants.
	w.SetLimit(1)
	fmt.Println("limit:", w.Limit())
	fmt.Println(w.Receive(8192))

	// Output:
	// limit: 8192 grant: 7168
	// limit: 1024
	// <nil>
}

// Chunk cuts a message held in several buffers into wire chunks without
// copying. A sender asks the window for at most one chunk's worth from the
// current buffer, since a chunk never spans two, and cuts as much as it got.
func ExampleChunk() {
	bufs := [][]byte{[]byte("Hello, "), []byte("tunneled world")}
	w := flowcontrol.NewSendWindow(flowcontrol.DefaultWindow)
	const maxChunk = 5 // a plain peer accepts up to flowcontrol.MaxChunk

	for len(bufs) > 0 {
		n, _ := w.Take(min(maxChunk, len(bufs[0])), nil)
		var chunk []byte
		chunk, bufs = flowcontrol.Chunk(bufs, n)
		fmt.Printf("%q\n", chunk)
	}

	// Output:
	// "Hello"
	// ", "
	// "tunne"
	// "led w"
	// "orld"
}
