package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// producer is a probe whose stream handler reads one request holding a byte
// count and a message size (32 KiB if absent), then sends that many bytes
// back in messages of that size.
var producer = &probe{stream: func(ss grpc.ServerStream) error {
	req := new(wrapperspb.BytesValue)
	if err := ss.RecvMsg(req); err != nil {
		return err
	}
	total := int(binary.BigEndian.Uint64(req.GetValue()))
	size := 32 * 1024
	if len(req.GetValue()) == 16 {
		size = int(binary.BigEndian.Uint64(req.GetValue()[8:]))
	}
	chunk := bytesValue(make([]byte, size))
	for sent := 0; sent < total; sent += len(chunk.GetValue()) {
		if err := ss.SendMsg(chunk); err != nil {
			return err
		}
	}
	return nil
}}

func produce(ctx context.Context, cc grpc.ClientConnInterface, n uint64, size ...uint64) (grpc.ClientStream, error) {
	cs, err := cc.NewStream(ctx, probeStreamDesc, probeStream)
	if err != nil {
		return nil, err
	}
	req := binary.BigEndian.AppendUint64(nil, n)
	for _, s := range size {
		req = binary.BigEndian.AppendUint64(req, s)
	}
	if err := cs.SendMsg(bytesValue(req)); err != nil {
		return nil, err
	}
	return cs, cs.CloseSend()
}

// TestStalledStreamDoesNotBlockOthers stalls one stream (its reader never
// reads) and checks that many other streams on the same tunnel still carry
// all their data: the stall is contained by the stalled stream's window.
func TestStalledStreamDoesNotBlockOthers(t *testing.T) {
	eachTransport(t, producer, func(t *testing.T, cc grpc.ClientConnInterface) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		stalled, err := produce(ctx, cc, 64<<20)
		if err != nil {
			t.Fatal(err)
		}
		_ = stalled // never read until the end

		const streams, each = 32, 1 << 20
		var wg sync.WaitGroup
		errs := make(chan error, streams)
		for range streams {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cs, err := produce(ctx, cc, each)
				if err != nil {
					errs <- err
					return
				}
				got := 0
				for {
					m := new(wrapperspb.BytesValue)
					err := cs.RecvMsg(m)
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						errs <- err
						return
					}
					got += len(m.GetValue())
				}
				if got != each {
					errs <- errors.New("short read")
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		// The stalled stream is still alive and delivers once read.
		m := new(wrapperspb.BytesValue)
		if err := stalled.RecvMsg(m); err != nil || len(m.GetValue()) != 32*1024 {
			t.Fatalf("stalled stream: %v", err)
		}
	})
}

// TestLargeMessages sends messages much larger than the window and the
// chunk size in both directions.
func TestLargeMessages(t *testing.T) {
	eachTransport(t, &probe{}, func(t *testing.T, cc grpc.ClientConnInterface) {
		big := make([]byte, 3<<20)
		for i := range big {
			big[i] = byte(i)
		}
		out, err := unary(context.Background(), cc, big)
		if err != nil {
			t.Fatal(err)
		}
		if len(out) != len(big) || out[len(out)-1] != big[len(big)-1] || out[12345] != big[12345] {
			t.Fatal("large message corrupted")
		}
	}, WithInitialWindowSize(4096))
}
