package tunnel

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
)

// TestAffinityKeyRefusalRacesClose ends a reverse tunnel from another
// goroutine while the handler refuses it for a non-comparable affinity key.
// The handler then clears askPeerToClose after the other goroutine's
// shutdown read it; under -race this fails unless both sides hold the
// tunnel's lock. The close is started from AffinityKey and given time to
// run before the key is returned, with no synchronisation the race detector
// would count as ordering the two.
func TestAffinityKeyRefusalRacesClose(t *testing.T) {
	handled := make(chan struct{})
	ts := startServer(t, TunnelServiceHandlerOptions{AffinityKey: func(ch TunnelChannel) any {
		go ch.Close()
		time.Sleep(50 * time.Millisecond)
		return []string{"not", "comparable"}
	}}, nil, grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		defer close(handled)
		return handler(srv, ss)
	}))
	rs := NewReverseTunnelServer(ts.stub)
	rs.RegisterService(&probeDesc, affIDProbe("racy"))
	t.Cleanup(rs.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The tunnel ends either way: cleanly, if the peer was asked to close
	// it, or with the handler's status.
	_, _ = rs.Serve(ctx)
	select {
	case <-handled:
	case <-ctx.Done():
		t.Fatal("the handler did not return")
	}
}
