// Command reverse shows a server calling a device that it cannot dial.
//
// A device behind NAT or a firewall can open connections to a server but
// cannot accept any. With a reverse tunnel the device dials out once, and the
// server then issues ordinary gRPC calls to services that the device hosts,
// back through that connection. The server finds the device by an affinity
// key that it derives from the metadata the device sent when it opened the
// tunnel, so it can address "device-1" by name rather than by connection.
//
// Both sides run in this one process, talking over loopback, so the example
// needs nothing else to run: it prints what happens, shuts down cleanly and
// exits 0, or exits 1 with the reason if any step fails or takes too long.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/internal/demopb"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// deviceIDHeader is the metadata key a device names itself with when it
// opens its tunnel. A real deployment would take the identity from the
// device's authenticated credentials instead of trusting a header.
const deviceIDHeader = "device-id"

func main() {
	// The timeout bounds the whole run, so a broken tunnel makes the example
	// fail rather than hang.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := run(ctx, os.Stdout); err != nil {
		cancel()
		fmt.Fprintln(os.Stderr, "reverse example failed:", err)
		os.Exit(1)
	}
}

// run plays both the server and the device until the server has called each
// of the device's methods, then shuts both down. It writes its narration to
// w and returns once every goroutine it started has ended.
func run(ctx context.Context, w io.Writer) error {
	out := &printer{w: w}

	// The callbacks below run on the handler's goroutines; these channels
	// let run wait for them, so the narration comes out in a fixed order.
	opened := make(chan struct{}, 1)
	closed := make(chan struct{}, 1)
	handler := tunnel.NewTunnelServiceHandler(tunnel.TunnelServiceHandlerOptions{
		// The tunnel's Context carries the metadata of the RPC that opened
		// it: that is where the device said who it is. Tunnels with the
		// same key form a group that KeyAsChannel addresses. A header is
		// only a claim, fine for a demo on loopback; a real server derives
		// the key from the authenticated identity (the client certificate,
		// or what an interceptor verified), as examples/secure shows, so
		// that no device can pose as another.
		AffinityKey: func(ch tunnel.TunnelChannel) any { return deviceID(ch) },
		OnReverseTunnelOpen: func(ch tunnel.TunnelChannel) {
			out.printf("server: %s opened a reverse tunnel\n", deviceID(ch))
			opened <- struct{}{}
		},
		OnReverseTunnelClose: func(ch tunnel.TunnelChannel) {
			out.printf("server: reverse tunnel from %s closed\n", deviceID(ch))
			closed <- struct{}{}
		},
	})

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	server := grpc.NewServer()
	tunnelpb.RegisterTunnelServiceServer(server, handler.Service())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(lis)
	}()
	// Stop is idempotent, so this is a safety net for early returns; the
	// normal path stops the server itself, in order.
	defer func() {
		server.Stop()
		<-served
	}()
	out.printf("server: listening; the device can reach it, it cannot reach the device\n")

	// The device: it dials the server like any gRPC client would.
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	device := &device{id: "device-1", out: out}
	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(conn))
	demopb.RegisterDeviceServiceServer(rs, device)
	serveCtx := metadata.AppendToOutgoingContext(ctx, deviceIDHeader, device.id)
	type serveResult struct {
		started bool
		err     error
	}
	serveDone := make(chan serveResult, 1)
	go func() {
		started, err := rs.Serve(serveCtx)
		serveDone <- serveResult{started, err}
	}()
	// Another safety net: Stop makes Serve return, and waits for it.
	defer rs.Stop()
	out.printf("device-1: dialling out to the server to offer DeviceService over a reverse tunnel\n")

	// The server side: wait until device-1's tunnel is usable. Ready
	// becomes true just before OnReverseTunnelOpen runs; waiting for the
	// callback too only keeps the printed lines in order.
	toDevice := handler.KeyAsChannel(device.id)
	if err := toDevice.WaitForReady(ctx); err != nil {
		// If Serve gave up (say, the server refused the tunnel), its
		// error is the better explanation.
		select {
		case res := <-serveDone:
			return fmt.Errorf("device-1's tunnel never became ready: Serve returned started=%t err=%v", res.started, res.err)
		default:
			return fmt.Errorf("waiting for device-1's tunnel: %w", err)
		}
	}
	if err := wait(ctx, opened); err != nil {
		return err
	}

	// The generated client works unchanged on the tunnel channel.
	client := demopb.NewDeviceServiceClient(toDevice)

	out.printf("server -> device-1: GetStatus (unary, through the reverse tunnel)\n")
	st, err := client.GetStatus(ctx, &demopb.GetStatusRequest{})
	if err != nil {
		return fmt.Errorf("GetStatus: %w", err)
	}
	out.printf("server <- device-1: served_by=%s state=%s calls_served=%d\n", st.GetServedBy(), st.GetState(), st.GetCallsServed())

	out.printf("server -> device-1: Tail lines=3 (server-streaming, through the reverse tunnel)\n")
	stream, err := client.Tail(ctx, &demopb.TailRequest{Lines: 3})
	if err != nil {
		return fmt.Errorf("Tail: %w", err)
	}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("Tail: %w", err)
		}
		out.printf("server <- device-1: log %q\n", msg.GetLine())
	}

	out.printf("server -> device-1: Notify (unary push, through the reverse tunnel)\n")
	ack, err := client.Notify(ctx, &demopb.NotifyRequest{Text: "firmware 2.1 is available"})
	if err != nil {
		return fmt.Errorf("Notify: %w", err)
	}
	out.printf("server <- device-1: served_by=%s accepted=%t\n", ack.GetServedBy(), ack.GetAccepted())

	// A device that never opened a tunnel cannot be reached: without
	// grpc.WaitForReady the call fails at once with Unavailable.
	_, err = demopb.NewDeviceServiceClient(handler.KeyAsChannel("device-2")).GetStatus(ctx, &demopb.GetStatusRequest{})
	if err == nil {
		return errors.New("GetStatus on device-2 succeeded, but device-2 has no tunnel")
	}
	out.printf("server -> device-2: GetStatus failed as expected: %s\n", status.Code(err))

	// Shut down from the device's end: GracefulStop lets calls in progress
	// finish, closes the tunnel and waits for Serve to return.
	out.printf("device-1: stopping\n")
	rs.GracefulStop()
	res := <-serveDone
	if !res.started || res.err != nil {
		return fmt.Errorf("device Serve ended with started=%t err=%v", res.started, res.err)
	}
	if err := wait(ctx, closed); err != nil {
		return err
	}
	if err := conn.Close(); err != nil {
		return err
	}
	server.Stop()
	<-served
	out.printf("done: the server reached device-1 %d times without ever dialling it\n", device.calls.Load())
	return nil
}

// deviceID returns the name a device gave when it opened ch, or "" if it
// gave none. The handler uses it as the tunnel's affinity key.
func deviceID(ch tunnel.TunnelChannel) string {
	md, _ := metadata.FromIncomingContext(ch.Context())
	if ids := md.Get(deviceIDHeader); len(ids) > 0 {
		return ids[0]
	}
	return ""
}

// wait receives from ch, or fails once ctx is done.
func wait(ctx context.Context, ch <-chan struct{}) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// device implements DeviceService on the device. Its handlers run on the
// device, called by the server through the tunnel.
type device struct {
	demopb.UnimplementedDeviceServiceServer
	id    string
	out   *printer
	calls atomic.Int64
}

// logLines is the device's log, oldest first.
var logLines = []string{
	"boot: firmware 2.0",
	"net: connected via NAT gateway",
	"sensor: temperature 21.5C",
	"sensor: temperature 21.7C",
}

func (d *device) GetStatus(context.Context, *demopb.GetStatusRequest) (*demopb.GetStatusResponse, error) {
	n := d.calls.Add(1)
	d.out.printf("%s: handling GetStatus\n", d.id)
	return &demopb.GetStatusResponse{ServedBy: d.id, State: "online", CallsServed: n}, nil
}

func (d *device) Tail(req *demopb.TailRequest, stream grpc.ServerStreamingServer[demopb.TailResponse]) error {
	d.calls.Add(1)
	lines := logLines
	if n := int(req.GetLines()); n > 0 && n < len(lines) {
		lines = lines[len(lines)-n:]
	}
	d.out.printf("%s: handling Tail, sending %d lines\n", d.id, len(lines))
	for _, l := range lines {
		if err := stream.Send(&demopb.TailResponse{Line: l}); err != nil {
			return err
		}
	}
	return nil
}

func (d *device) Notify(_ context.Context, req *demopb.NotifyRequest) (*demopb.NotifyResponse, error) {
	d.calls.Add(1)
	d.out.printf("%s: handling Notify: %q\n", d.id, req.GetText())
	return &demopb.NotifyResponse{ServedBy: d.id, Accepted: true}, nil
}

// printer serialises writes to w: the server, the device and the tunnel
// callbacks all narrate from different goroutines.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *printer) printf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format, args...)
}
