package flowcontrol

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestSendWindowTakesAtMostAvailable(t *testing.T) {
	w := NewSendWindow(10)
	if n, ok := w.Take(4, nil); !ok || n != 4 {
		t.Fatalf("Take(4) = %d, %v; want 4, true", n, ok)
	}
	if n, ok := w.Take(100, nil); !ok || n != 6 {
		t.Fatalf("Take(100) = %d, %v; want 6, true", n, ok)
	}
	if got := w.Available(); got != 0 {
		t.Fatalf("Available() = %d; want 0", got)
	}
}

func TestSendWindowTakeWaitsForAdd(t *testing.T) {
	w := NewSendWindow(0)
	got := make(chan int)
	go func() {
		n, _ := w.Take(50, nil)
		got <- n
	}()
	if err := w.Add(20); err != nil {
		t.Fatal(err)
	}
	if n := <-got; n != 20 {
		t.Fatalf("Take after Add(20) = %d; want 20", n)
	}
}

func TestSendWindowTakeStopsOnDone(t *testing.T) {
	w := NewSendWindow(0)
	done := make(chan struct{})
	close(done)
	if n, ok := w.Take(1, done); ok || n != 0 {
		t.Fatalf("Take on a closed done = %d, %v; want 0, false", n, ok)
	}
}

func TestSendWindowOverflow(t *testing.T) {
	w := NewSendWindow(MaxWindow - 1)
	if err := w.Add(1); err != nil {
		t.Fatalf("Add up to MaxWindow: %v", err)
	}
	if err := w.Add(1); !errors.Is(err, ErrOverflow) {
		t.Fatalf("Add past MaxWindow = %v; want ErrOverflow", err)
	}
	if got := w.Available(); got != MaxWindow {
		t.Fatalf("a refused Add changed the window to %d", got)
	}
}

func TestUnlimitedNeverBlocks(t *testing.T) {
	w := Unlimited()
	if n, ok := w.Take(1<<30, nil); !ok || n != 1<<30 {
		t.Fatalf("Take = %d, %v", n, ok)
	}
}

// TestSendWindowConcurrent moves many bytes through a small window with a
// receiver that returns credit in odd amounts; the total taken must equal the
// total sent and no Take may be starved.
func TestSendWindowConcurrent(t *testing.T) {
	const total = 1 << 20
	w := NewSendWindow(1000)
	credits := make(chan int, 1024)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := range credits {
			if err := w.Add(uint32(n)); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	sent := 0
	for sent < total {
		n, ok := w.Take(min(777, total-sent), nil)
		if !ok {
			t.Fatal("Take failed")
		}
		sent += n
		credits <- n
	}
	close(credits)
	wg.Wait()
	if sent != total {
		t.Fatalf("sent %d; want %d", sent, total)
	}
}

func TestRecvWindowDetectsOverrun(t *testing.T) {
	w := NewRecvWindow(100, 100)
	if err := w.Receive(100); err != nil {
		t.Fatalf("Receive within the grant: %v", err)
	}
	if err := w.Receive(1); !errors.Is(err, ErrOverrun) {
		t.Fatalf("Receive past the grant = %v; want ErrOverrun", err)
	}
}

func TestRecvWindowBatchesUpdates(t *testing.T) {
	w := NewRecvWindow(4096, 4096)
	if err := w.Receive(4096); err != nil {
		t.Fatal(err)
	}
	// Less than a quarter of the window consumed: no update yet.
	if u := w.Consume(1000); u != 0 {
		t.Fatalf("Consume(1000) = %d; want 0 (batched)", u)
	}
	// Crossing a quarter grants everything consumed so far.
	if u := w.Consume(100); u != 1100 {
		t.Fatalf("Consume(100) = %d; want 1100", u)
	}
	// Consuming the rest always grants, so a full window never stalls.
	if u := w.Consume(2996); u != 2996 {
		t.Fatalf("Consume(rest) = %d; want 2996", u)
	}
	if err := w.Receive(4096); err != nil {
		t.Fatalf("the peer may send a whole window again: %v", err)
	}
}

func TestRecvWindowWidensForLargeMessage(t *testing.T) {
	w := NewRecvWindow(1024, 1024)
	if u := w.BeginMessage(512); u != 0 {
		t.Fatalf("a message within the window needs no extra credit, got %d", u)
	}
	if err := w.Receive(512); err != nil {
		t.Fatal(err)
	}
	// 512 received, the grant is 1024; a 10000-byte message must be
	// grantable in full, up to offset 10512.
	if u := w.BeginMessage(10000); u != 10512-1024 {
		t.Fatalf("BeginMessage(10000) = %d; want %d", u, 10512-1024)
	}
	if err := w.Receive(10000); err != nil {
		t.Fatalf("the widened window must admit the whole message: %v", err)
	}
	if err := w.Receive(1); !errors.Is(err, ErrOverrun) {
		t.Fatalf("widening is exact; got %v", err)
	}
}

func TestRecvWindowSetLimit(t *testing.T) {
	w := NewRecvWindow(1024, 1024)
	w.SetLimit(8192)
	if err := w.Receive(1024); err != nil {
		t.Fatal(err)
	}
	if u := w.Consume(1024); u != 8192 {
		t.Fatalf("after growing the limit, Consume = %d; want 8192", u)
	}
	w.SetLimit(1)
	if got := w.Limit(); got != MinWindow {
		t.Fatalf("Limit() = %d; want the minimum %d", got, MinWindow)
	}
}

func TestChunk(t *testing.T) {
	a := bytes.Repeat([]byte("a"), 10)
	b := bytes.Repeat([]byte("b"), 3)
	bufs := [][]byte{nil, a, {}, b}
	var got []string
	for {
		var c []byte
		c, bufs = Chunk(bufs, 4)
		if c == nil {
			break
		}
		got = append(got, string(c))
	}
	want := []string{"aaaa", "aaaa", "aa", "bbb"}
	if len(got) != len(want) {
		t.Fatalf("chunks %q; want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("chunks %q; want %q", got, want)
		}
	}
}

func TestRecvWindowAutoTuneGrowsOnStalls(t *testing.T) {
	w := NewRecvWindow(1024, 1024)
	w.AutoTune(8192, time.Hour)
	// The peer uses all its credit and the application keeps up: each
	// such round doubles the limit, up to the ceiling.
	for _, want := range []uint32{2048, 4096, 8192, 8192} {
		granted := w.granted.Load() - w.received.Load()
		if err := w.Receive(int(granted)); err != nil {
			t.Fatal(err)
		}
		if u := w.Consume(int(granted)); u == 0 {
			t.Fatal("a drained window must be replenished")
		}
		if got := w.Limit(); got != want {
			t.Fatalf("limit %d; want %d", got, want)
		}
	}
}

func TestRecvWindowAutoTuneIgnoresSlowApplications(t *testing.T) {
	w := NewRecvWindow(1024, 1024)
	w.AutoTune(8192, time.Hour)
	if err := w.Receive(1024); err != nil {
		t.Fatal(err)
	}
	// The application lags behind: half of the data is still queued when
	// it consumes, so a larger window would only buffer more.
	w.Consume(512)
	if got := w.Limit(); got != 1024 {
		t.Fatalf("limit grew to %d while the application was the bottleneck", got)
	}
}

func TestRecvWindowAutoTuneShrinksWhenIdle(t *testing.T) {
	w := NewRecvWindow(1024, 1024)
	w.AutoTune(8192, time.Nanosecond)
	if err := w.Receive(1024); err != nil {
		t.Fatal(err)
	}
	w.Consume(1024) // grows to 2048
	start := time.Now()
	for time.Since(start) < time.Millisecond {
		// Let more than the idle period pass without consumption.
	}
	if err := w.Receive(100); err != nil {
		t.Fatal(err)
	}
	w.Consume(100)
	if got := w.Limit(); got != 1024 {
		t.Fatalf("limit %d after idling; want the starting 1024", got)
	}
}
