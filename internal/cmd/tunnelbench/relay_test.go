package main

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// TestRelay checks that the relay delivers every byte, in order, in both
// directions, and no sooner than the delay allows: a round trip through it
// takes at least twice the one-way delay.
func TestRelay(t *testing.T) {
	const delay = 20 * time.Millisecond
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var echoes sync.WaitGroup
	echoes.Go(func() { // an echo server for one connection
		c, err := lis.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	})
	defer func() {
		_ = lis.Close()
		echoes.Wait()
	}()
	r, err := startRelay(lis.Addr().String(), delay)
	if err != nil {
		t.Fatal(err)
	}
	defer r.close()
	c, err := net.Dial("tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// One small message: its round trip shows the delay.
	start := time.Now()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(start); rtt < 2*delay {
		t.Errorf("round trip took %v, want at least %v", rtt, 2*delay)
	}
	if string(got) != "ping" {
		t.Errorf("echoed %q, want %q", got, "ping")
	}

	// Many chunks' worth, written while the echo is read: it must come
	// back whole and in order.
	sent := make([]byte, 4<<20)
	for i := range sent {
		sent[i] = byte(i * 7 / 5)
	}
	var writer sync.WaitGroup
	writer.Go(func() { _, _ = c.Write(sent) })
	back := make([]byte, len(sent))
	_, err = io.ReadFull(c, back)
	writer.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, sent) {
		t.Error("the echo differs from what was sent")
	}
}
