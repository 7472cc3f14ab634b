package testkit

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/fullstorydev/grpchan/grpchantesting"
)

// CallEveryKind makes one call of each of gRPC's four kinds on client,
// every message carrying payload: a unary call, a client stream of n
// messages, a server stream of n answers, and a bidirectional stream of n
// exchanges, each run to its end. Tests of what a hop records per call (an
// access log, metrics) use it so that no kind is forgotten.
func CallEveryKind(ctx context.Context, client grpchantesting.TestServiceClient, payload []byte, n int) error {
	msg := &grpchantesting.Message{Payload: payload}
	if _, err := client.Unary(ctx, msg); err != nil {
		return fmt.Errorf("unary: %w", err)
	}
	cs, err := client.ClientStream(ctx)
	if err != nil {
		return fmt.Errorf("client stream: %w", err)
	}
	for range n {
		if err := cs.Send(msg); err != nil {
			return fmt.Errorf("client stream: %w", err)
		}
	}
	if _, err := cs.CloseAndRecv(); err != nil {
		return fmt.Errorf("client stream: %w", err)
	}
	ss, err := client.ServerStream(ctx, &grpchantesting.Message{Payload: payload, Count: int32(n)})
	if err != nil {
		return fmt.Errorf("server stream: %w", err)
	}
	for {
		if _, err := ss.Recv(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return fmt.Errorf("server stream: %w", err)
		}
	}
	bidi, err := client.BidiStream(ctx)
	if err != nil {
		return fmt.Errorf("bidi stream: %w", err)
	}
	for range n {
		if err := bidi.Send(msg); err != nil {
			return fmt.Errorf("bidi stream: %w", err)
		}
		if _, err := bidi.Recv(); err != nil {
			return fmt.Errorf("bidi stream: %w", err)
		}
	}
	if err := bidi.CloseSend(); err != nil {
		return fmt.Errorf("bidi stream: %w", err)
	}
	if _, err := bidi.Recv(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("bidi stream ended with %v, want EOF", err)
	}
	return nil
}
