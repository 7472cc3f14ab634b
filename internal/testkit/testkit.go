// Package testkit holds the small tools the project's tests share, so that
// each test package does not carry its own copy.
package testkit

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// WaitFor polls cond until it holds, failing the test after a generous
// deadline. Tests wait on conditions, never on guessed sleeps.
func WaitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(time.Millisecond)
	}
}

// Header is a channel that adds the header Key: Value to every call, as a
// caller of a gateway names the agent it wants.
type Header struct {
	grpc.ClientConnInterface
	Key, Value string
}

// Invoke makes a unary call with the header.
func (h Header) Invoke(ctx context.Context, method string, req, reply any, opts ...grpc.CallOption) error {
	return h.ClientConnInterface.Invoke(metadata.AppendToOutgoingContext(ctx, h.Key, h.Value), method, req, reply, opts...)
}

// NewStream starts a streaming call with the header.
func (h Header) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return h.ClientConnInterface.NewStream(metadata.AppendToOutgoingContext(ctx, h.Key, h.Value), desc, method, opts...)
}
