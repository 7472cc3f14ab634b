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

// fakeClock replaces the package clock for one test.
func fakeClock(t *testing.T) *int64 {
	var c int64 = 1
	saved := now
	now = func() int64 { return c }
	t.Cleanup(func() { now = saved })
	return &c
}

// TestRecvWindowAutoTuneGrowsWhenWindowBound plays a link with a 10 ms round
// trip over which a whole window arrives in one round trip: the window is
// the bottleneck, so it doubles.
func TestRecvWindowAutoTuneGrowsWhenWindowBound(t *testing.T) {
	clock := fakeClock(t)
	w := NewRecvWindow(1024, 1024)
	w.AutoTune(1<<20, time.Hour, nil)
	ms := int64(time.Millisecond)
	for round := range 3 {
		limit := int64(w.Limit())
		// The peer sends what it may; the application keeps up, and the
		// update it earns starts a probe.
		if err := w.Receive(int(w.granted.Load() - w.received.Load())); err != nil {
			t.Fatal(err)
		}
		if u := w.Consume(int(w.received.Load() - w.consumed.Load())); u == 0 {
			t.Fatal("no update for a drained window")
		}
		// One round trip later the first bytes the update allowed arrive,
		// and within the next round trip a whole window does.
		*clock += 10 * ms
		if err := w.Receive(1); err != nil {
			t.Fatal(err)
		}
		*clock += 9 * ms
		if err := w.Receive(int(limit - 2)); err != nil {
			t.Fatal(err)
		}
		*clock += 2 * ms
		if err := w.Receive(1); err != nil {
			t.Fatal(err)
		}
		if got := int64(w.Limit()); got < 2*limit {
			t.Fatalf("round %d: limit %d; want at least %d", round, got, 2*limit)
		}
		w.Consume(int(w.received.Load() - w.consumed.Load()))
	}
}

// TestRecvWindowAutoTuneKeepsWindowWhenNotBound plays a sender that is
// slower than the window allows: a round trip carries a small part of the
// window, so it stays.
func TestRecvWindowAutoTuneKeepsWindowWhenNotBound(t *testing.T) {
	clock := fakeClock(t)
	w := NewRecvWindow(4096, 4096)
	w.AutoTune(1<<20, time.Hour, nil)
	ms := int64(time.Millisecond)
	if err := w.Receive(4096); err != nil {
		t.Fatal(err)
	}
	w.Consume(4096)
	*clock += 10 * ms
	for range 5 {
		if err := w.Receive(100); err != nil {
			t.Fatal(err)
		}
		*clock += 3 * ms
	}
	if got := w.Limit(); got != 4096 {
		t.Fatalf("limit grew to %d for a sender that never filled it", got)
	}
}

func TestRecvWindowAutoTuneIgnoresSlowApplications(t *testing.T) {
	w := NewRecvWindow(1024, 1024)
	w.AutoTune(8192, time.Hour, nil)
	if err := w.Receive(1024); err != nil {
		t.Fatal(err)
	}
	// The application lags behind: no update goes out, so no probe runs
	// and the window cannot grow.
	w.Consume(100)
	if got := w.Limit(); got != 1024 {
		t.Fatalf("limit grew to %d while the application was the bottleneck", got)
	}
}

func TestRecvWindowAutoTuneShrinksWhenIdle(t *testing.T) {
	clock := fakeClock(t)
	w := NewRecvWindow(1024, 1024)
	w.AutoTune(8192, time.Second, nil)
	w.limit.Store(4096) // as if it had grown
	if err := w.Receive(100); err != nil {
		t.Fatal(err)
	}
	w.Consume(100)
	if got := w.Limit(); got != 4096 {
		t.Fatalf("limit %d while busy; want 4096", got)
	}
	*clock += int64(2 * time.Second)
	if err := w.Receive(100); err != nil {
		t.Fatal(err)
	}
	w.Consume(100)
	if got := w.Limit(); got != 1024 {
		t.Fatalf("limit %d after idling; want the starting 1024", got)
	}
}

// TestHintCarriesGrowthToNewWindows grows one window and checks that the
// next one on the same hint starts at that size, until the hint fades.
func TestHintCarriesGrowthToNewWindows(t *testing.T) {
	clock := fakeClock(t)
	var hint Hint
	first := NewRecvWindow(1024, 1024)
	first.AutoTune(1<<20, time.Second, &hint)
	first.grow(10000)
	second := NewRecvWindow(1024, 1024)
	second.AutoTune(1<<20, time.Second, &hint)
	if got := second.Limit(); got != 20000 {
		t.Fatalf("new window starts at %d; want the learned 20000", got)
	}
	if g := second.Grant(); g != 20000-1024 {
		t.Fatalf("Grant() = %d; want %d", g, 20000-1024)
	}
	*clock += int64(HintLifetime + time.Second)
	third := NewRecvWindow(1024, 1024)
	third.AutoTune(1<<20, time.Second, &hint)
	if got := third.Limit(); got != 1024 {
		t.Fatalf("after the hint faded a window starts at %d; want 1024", got)
	}
}
