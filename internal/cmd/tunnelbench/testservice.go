package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// The gateway rows call gRPC's interop TestService, the service every gRPC
// implementation tests itself against, through its generated client: a
// gateway forwards calls without knowing their schema, so it is best shown
// with a service and client that know nothing of it.

// smallMessage is the size of the small streamed messages, whose rate is
// counted in messages rather than bytes.
const smallMessage = 1 << 10

// duplexBatchBytes is how much each request of a streaming probe asks the
// service to send back: a batch of messages, so that the requests going up
// the stream cost little next to the responses coming down.
const duplexBatchBytes = 64 << 10

// testUnaryCall is a UnaryCall with unaryPayload bytes each way.
func testUnaryCall() unaryCall {
	req := &testgrpc.SimpleRequest{
		ResponseType: testgrpc.PayloadType_COMPRESSABLE,
		ResponseSize: unaryPayload,
		Payload:      &testgrpc.Payload{Body: make([]byte, unaryPayload)},
	}
	return func(ctx context.Context, cc grpc.ClientConnInterface) error {
		resp, err := testgrpc.NewTestServiceClient(cc).UnaryCall(ctx, req)
		if err != nil {
			return err
		}
		if n := len(resp.GetPayload().GetBody()); n != unaryPayload {
			return fmt.Errorf("response of %d bytes, want %d", n, unaryPayload)
		}
		return nil
	}
}

// duplexStream returns a probe that has the service send messages of size
// bytes down one FullDuplexCall for d and reports their rate: messages per
// second if perMessage, else MiB/s. The caller keeps sending requests, each
// for a batch of messages, as fast as the stream's flow control takes them,
// so the service never waits for one; what limits the rate is the path
// down. The clock starts at the first message, so the rate excludes opening
// the stream and the first round trip: it is the rate a long-lived stream
// sustains.
func duplexStream(size int, perMessage bool) probe {
	batch := max(1, duplexBatchBytes/size)
	req := &testgrpc.StreamingOutputCallRequest{ResponseType: testgrpc.PayloadType_COMPRESSABLE}
	for range batch {
		req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: int32(size)})
	}
	return func(ctx context.Context, cc grpc.ClientConnInterface, d time.Duration) (figs []float64, err error) {
		ctx, cancel := context.WithCancel(ctx)
		// Messages above gRPC's default 4 MiB limit are allowed on
		// purpose: -size decides, not a default meant to stop accidents.
		stream, err := testgrpc.NewTestServiceClient(cc).FullDuplexCall(ctx, grpc.MaxCallRecvMsgSize(size+1024))
		if err != nil {
			cancel()
			return nil, err
		}
		var sender sync.WaitGroup
		defer func() {
			cancel() // ends the call, and with it the sender
			sender.Wait()
		}()
		sender.Go(func() {
			for stream.Send(req) == nil {
			}
		})
		msg := new(testgrpc.StreamingOutputCallResponse)
		recv := func() error {
			if err := stream.RecvMsg(msg); err != nil {
				if errors.Is(err, io.EOF) {
					return errors.New("the stream ended early")
				}
				return err
			}
			if n := len(msg.GetPayload().GetBody()); n != size {
				return fmt.Errorf("received %d bytes, want %d", n, size)
			}
			return nil
		}
		if err := recv(); err != nil {
			return nil, err
		}
		start := time.Now()
		n := 0
		for time.Since(start) < d {
			if err := recv(); err != nil {
				return nil, err
			}
			n++
		}
		rate := float64(n) / time.Since(start).Seconds()
		if perMessage {
			return []float64{rate}, nil
		}
		return []float64{rate * float64(size) / mib}, nil
	}
}
