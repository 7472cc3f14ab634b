package gateway_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/agent"
	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// runAgent runs an agent with key and n tunnels over its own connection to
// the gateway, in front of a test backend; see runAgentWith.
func runAgent(t *testing.T, g *gateway.Gateway, gw *grpc.ClientConn, key string, n int) (*agent.Agent, *grpc.ClientConn, <-chan error) {
	t.Helper()
	return runAgentWith(t, g, gw, startBackend(t), agent.Options{Key: key, Reconnect: tunnel.ReconnectOptions{Tunnels: n}})
}

// runAgentWith runs an agent configured by opts in front of target, over
// its own connection to the gateway, waits until the gateway holds its
// tunnels, and returns it with its connection and the channel Run's result
// arrives on. The agent is stopped at cleanup.
func runAgentWith(t *testing.T, g *gateway.Gateway, gw *grpc.ClientConn, target grpc.ClientConnInterface, opts agent.Options) (*agent.Agent, *grpc.ClientConn, <-chan error) {
	t.Helper()
	conn := dial(t, gw)
	a, err := agent.New(conn, target, opts)
	if err != nil {
		t.Fatal(err)
	}
	before := tunnelsOf(g, opts.Key)
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		done <- a.Run(context.Background())
	}()
	t.Cleanup(func() {
		a.Stop()
		<-finished
	})
	want := before + max(opts.Reconnect.Tunnels, 1)
	waitFor(t, func() bool { return tunnelsOf(g, opts.Key) == want })
	return a, conn, done
}

// load keeps callers calling key through conn until stop is called, which
// returns every call's error, in the order they ended, and how many calls
// started after mark was called.
type load struct {
	stop    func() []error
	mark    func()
	started atomic.Int64 // calls started since mark
}

func startLoad(t *testing.T, conn grpc.ClientConnInterface, key string, callers int) *load {
	t.Helper()
	l := &load{}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		errs   []error
		marked atomic.Bool
		halt   atomic.Bool
	)
	client := grpchantesting.NewTestServiceClient(keyed(conn, key))
	for range callers {
		wg.Go(func() {
			for !halt.Load() {
				after := marked.Load()
				_, err := client.Unary(context.Background(), &grpchantesting.Message{DelayMillis: 1})
				if after {
					l.started.Add(1)
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	l.mark = func() { marked.Store(true) }
	l.stop = func() []error {
		halt.Store(true)
		wg.Wait()
		return errs
	}
	t.Cleanup(func() { l.stop() })
	return l
}

// An agent that stops gracefully while calls flow loses none of them: the
// gateway hears of the drain, sends new calls to the other agents of the
// key, and lets the calls in progress finish.
func TestGracefulAgentStopLosesNoCall(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	leaving, _, done := runAgent(t, g, gw, "pool", 2)
	runAgent(t, g, gw, "pool", 2)
	runAgent(t, g, gw, "pool", 2)

	l := startLoad(t, gw, "pool", 8)
	waitFor(t, func() bool { return openStreams(g, "pool") > 0 })
	leaving.GracefulStop()
	if err := <-done; err != nil {
		t.Fatalf("agent Run after GracefulStop: %v", err)
	}
	waitFor(t, func() bool { return tunnelsOf(g, "pool") == 4 })
	l.mark()
	waitFor(t, func() bool { return l.started.Load() >= 100 })
	for _, err := range l.stop() {
		t.Errorf("a call failed while an agent left gracefully: %v", err)
	}
}

// When an agent's connection dies, only the calls it was running fail,
// with Unavailable naming its key; calls started once the gateway has seen
// it go all reach the others.
func TestAgentLostMidCall(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	_, conn, _ := runAgent(t, g, gw, "pool", 2)
	runAgent(t, g, gw, "pool", 2)
	runAgent(t, g, gw, "pool", 2)

	l := startLoad(t, gw, "pool", 8)
	waitFor(t, func() bool { return openStreams(g, "pool") > 0 })
	_ = conn.Close() // as if the agent's process died
	waitFor(t, func() bool { return tunnelsOf(g, "pool") == 4 })
	l.mark()
	waitFor(t, func() bool { return l.started.Load() >= 100 })
	errs := l.stop()
	for _, err := range errs {
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `(key "pool") was lost`) {
			t.Errorf("a call on the lost agent failed with %v; want Unavailable saying the agent's tunnel was lost", err)
		}
	}
	// Later calls all succeed.
	client := grpchantesting.NewTestServiceClient(keyed(gw, "pool"))
	for range 50 {
		if _, err := client.Unary(context.Background(), &grpchantesting.Message{}); err != nil {
			t.Fatalf("a call after the agent was gone: %v", err)
		}
	}
}

// An agent whose service is down tells callers so, without the service's
// internal address; the agent counts the failures and logs the cause.
func TestAgentCannotReachItsService(t *testing.T) {
	g, gw := startGateway(t, gateway.Options{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close() // nothing listens there now
	target, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = target.Close() })

	a, _, _ := runAgentWith(t, g, gw, target, agent.Options{Key: "down"})

	_, err = grpchantesting.NewTestServiceClient(keyed(gw, "down")).Unary(context.Background(), &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), `grpctunnel agent "down": cannot reach its service`) {
		t.Fatalf("call to an agent whose service is down: %v; want Unavailable saying the agent cannot reach its service", err)
	}
	if strings.Contains(err.Error(), addr) {
		t.Errorf("the caller was shown the service's address: %v", err)
	}
	if n := a.ServiceUnreachable(); n != 1 {
		t.Errorf("ServiceUnreachable = %d, want 1", n)
	}
}

// A message too large for a hop fails with ResourceExhausted saying which
// hop refused it and what raises the limit.
func TestMessageSizeSaysWhichHop(t *testing.T) {
	const limit = 1 << 20
	g, gw := startGateway(t, gateway.Options{MaxMessageSize: 4 * limit})
	runAgentWith(t, g, gw, startBackend(t), agent.Options{Key: "small", MaxMessageSize: limit})
	client := grpchantesting.NewTestServiceClient(keyed(gw, "small"))

	_, err := client.Unary(context.Background(), &grpchantesting.Message{Payload: make([]byte, 2*limit)})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), `agent "small" refused the request`) || !strings.Contains(err.Error(), "--max-msg-size") {
		t.Errorf("a request too large for the agent: %v", err)
	}
	_, err = client.Unary(context.Background(), &grpchantesting.Message{Payload: make([]byte, 5*limit)})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "received message larger than max") {
		t.Errorf("a request too large for the gateway: %v", err)
	}
	// Within both limits the call goes through.
	if _, err := client.Unary(context.Background(), &grpchantesting.Message{Payload: make([]byte, limit/2)}); err != nil {
		t.Errorf("a request within the limits: %v", err)
	}
}

// A caller's key is repeated in errors only in part, however long it is.
func TestLongKeyIsNotEchoedWhole(t *testing.T) {
	_, gw := startGateway(t, gateway.Options{})
	key := strings.Repeat("k", 256<<10)
	_, err := grpchantesting.NewTestServiceClient(keyed(gw, key)).Unary(context.Background(), &grpchantesting.Message{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "(262144 bytes)") {
		t.Fatalf("a call naming an unknown 256 KiB key: %.200v", err)
	}
	if n := len(status.Convert(err).Message()); n > 200 {
		t.Errorf("the error repeats %d bytes of the caller's key", n)
	}
}
