package tunnel

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip" // registers "gzip", as applications do
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// compressible is a message that gzip shrinks a hundredfold.
func compressible(n int) *wrapperspb.BytesValue {
	return bytesValue(bytes.Repeat([]byte("tunnel "), n/7))
}

// TestCompressionBetweenPeers checks that grpc.UseCompressor compresses a
// call's messages both ways between two ends of this package, over forward
// and reverse tunnels, and that stats handlers see it.
func TestCompressionBetweenPeers(t *testing.T) {
	for _, tr := range transports[:2] {
		t.Run(tr.name, func(t *testing.T) {
			client, server := &statsRecorder{}, &statsRecorder{}
			cc := tr.dial(t, testServices(&probe{}), []TunnelOption{WithStatsHandler(server), WithClientStatsHandler(client)})
			ctx := context.Background()

			req := compressible(256 << 10)
			out := new(wrapperspb.BytesValue)
			if err := cc.Invoke(ctx, probeUnary, req, out, grpc.UseCompressor("gzip")); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(out, req) {
				t.Fatal("response differs from the request")
			}
			size := proto.Size(req)
			ce := client.ended(t, probeUnary, 1)
			if oh := find[*stats.OutHeader](ce)[0]; oh.Compression != "gzip" {
				t.Errorf("client OutHeader.Compression = %q", oh.Compression)
			}
			if op := find[*stats.OutPayload](ce)[0]; op.Length != size || op.CompressedLength > size/50 {
				t.Errorf("request sent as %d bytes for %d, want compressed", op.CompressedLength, op.Length)
			}
			if ih := find[*stats.InHeader](ce)[0]; ih.Compression != "gzip" {
				t.Errorf("client InHeader.Compression = %q", ih.Compression)
			}
			if ip := find[*stats.InPayload](ce)[0]; ip.Length != size || ip.CompressedLength > size/50 {
				t.Errorf("response received as %d bytes for %d, want compressed", ip.CompressedLength, ip.Length)
			}
			se := server.ended(t, probeUnary, 1)
			if ih := find[*stats.InHeader](se)[0]; ih.Compression != "gzip" {
				t.Errorf("server InHeader.Compression = %q", ih.Compression)
			}
			if op := find[*stats.OutPayload](se)[0]; op.Length != size || op.CompressedLength > size/50 {
				t.Errorf("response sent as %d bytes for %d, want compressed", op.CompressedLength, op.Length)
			}

			// A stream, with an empty message among the others and a message
			// larger than a chunk once compressed.
			s, err := cc.NewStream(ctx, probeStreamDesc, probeStream, grpc.UseCompressor("gzip"))
			if err != nil {
				t.Fatal(err)
			}
			random := make([]byte, 300<<10)
			for i := range random {
				random[i] = byte(i*7919 + i>>8)
			}
			for _, m := range []*wrapperspb.BytesValue{compressible(1 << 20), bytesValue(nil), bytesValue(random)} {
				if err := s.SendMsg(m); err != nil {
					t.Fatal(err)
				}
				got := new(wrapperspb.BytesValue)
				if err := s.RecvMsg(got); err != nil {
					t.Fatal(err)
				}
				if !proto.Equal(got, m) {
					t.Fatalf("echo of a %d-byte message differs", proto.Size(m))
				}
			}
			if err := s.CloseSend(); err != nil {
				t.Fatal(err)
			}
			if err := s.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
				t.Fatalf("end of stream: %v", err)
			}
		})
	}
}

// TestCompressionWithPlainPeers checks that a call asking for compression
// works uncompressed when the other end speaks only the published protocol,
// whichever end that is.
func TestCompressionWithPlainPeers(t *testing.T) {
	for _, c := range []struct {
		name           string
		server, client []TunnelOption
	}{
		{"plain server", []TunnelOption{WithPlainProtocol()}, nil},
		{"plain client", nil, []TunnelOption{WithPlainProtocol()}},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec := &statsRecorder{}
			ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: c.server}, testServices(&probe{}))
			ch := forward(t, ts.stub, append(c.client, WithClientStatsHandler(rec))...)
			req := compressible(64 << 10)
			out := new(wrapperspb.BytesValue)
			if err := ch.Invoke(context.Background(), probeUnary, req, out, grpc.UseCompressor("gzip")); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(out, req) {
				t.Fatal("response differs from the request")
			}
			events := rec.ended(t, probeUnary, 1)
			if op := find[*stats.OutPayload](events)[0]; op.CompressedLength != op.Length {
				t.Errorf("request sent as %d bytes for %d, want uncompressed", op.CompressedLength, op.Length)
			}
			if got := ch.Info().BytesSent; got < uint64(proto.Size(req)) {
				t.Errorf("tunnel carried %d bytes for a %d-byte request", got, proto.Size(req))
			}
		})
	}
}

// TestCompressionLimits checks that the message size limits apply to what
// a compressed message becomes, on both ends, and that asking for a
// compressor that is not registered fails as it does in gRPC.
func TestCompressionLimits(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{TunnelOptions: []TunnelOption{WithMaxRecvMsgSize(64 << 10)}}, testServices(&probe{
		stream: func(ss grpc.ServerStream) error {
			// Answers anything with a megabyte that compresses to a few KiB.
			if err := ss.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
				return err
			}
			return ss.SendMsg(compressible(1 << 20))
		},
	}))
	ch := forward(t, ts.stub)
	ctx := context.Background()

	err := ch.Invoke(ctx, probeUnary, compressible(1<<20), new(wrapperspb.BytesValue), grpc.UseCompressor("gzip"))
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "after decompression") {
		t.Errorf("request that decompresses past the server's limit: %v", err)
	}

	s, err := ch.NewStream(ctx, probeStreamDesc, probeStream, grpc.UseCompressor("gzip"), grpc.MaxCallRecvMsgSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SendMsg(bytesValue(nil)); err != nil {
		t.Fatal(err)
	}
	if err := s.RecvMsg(new(wrapperspb.BytesValue)); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "after decompression") {
		t.Errorf("response that decompresses past the caller's limit: %v", err)
	}

	err = ch.Invoke(ctx, probeUnary, bytesValue(nil), new(wrapperspb.BytesValue), grpc.UseCompressor("no-such-compressor"))
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "not installed") {
		t.Errorf("call with an unregistered compressor: %v", err)
	}

	// The tunnel is still fine.
	if err := ch.Invoke(ctx, probeUnary, bytesValue([]byte("ok")), new(wrapperspb.BytesValue), grpc.UseCompressor("gzip")); err != nil {
		t.Errorf("call after the failures: %v", err)
	}
}

// TestCompressionFromOtherPeers drives the handling end by hand: what a
// peer that agreed to compression may get wrong fails the call with gRPC's
// status for it, and a peer that did not agree gets its grpc-encoding
// header ignored, as the published protocol has it.
func TestCompressionFromOtherPeers(t *testing.T) {
	ts := startServer(t, TunnelServiceHandlerOptions{}, testServices(echoProbe()))
	req := mustMarshal(t, bytesValue([]byte("plain bytes")))

	r := openRawNegotiated(t, ts.stub, "grpctunnel-extensions", "compression")
	r.send(newStreamFrame(1, probeUnary, rev1, 65536, "grpc-encoding", "no-such-compressor"))
	if _, st := r.readResponse(1, false); st.Code() != codes.Unimplemented || !strings.Contains(st.Message(), "no-such-compressor") {
		t.Errorf("unknown compressor: %v", st)
	}
	r.send(newStreamFrame(2, probeUnary, rev1, 65536, "grpc-encoding", "gzip"))
	r.sendMessage(2, req) // not gzip
	r.send(halfCloseFrame(2))
	if _, st := r.readResponse(2, false); st.Code() != codes.Internal || !strings.Contains(st.Message(), "decompress") {
		t.Errorf("message that is not what its compressor makes: %v", st)
	}
	rawEcho(t, r, 3)

	plain := openRawNegotiated(t, ts.stub)
	plain.send(newStreamFrame(1, probeUnary, rev1, 65536, "grpc-encoding", "gzip"))
	plain.sendMessage(1, req)
	plain.send(halfCloseFrame(1))
	if msgs, st := plain.readResponse(1, false); st.Code() != codes.OK || len(msgs) != 1 || !bytes.Equal(msgs[0], req) {
		t.Errorf("grpc-encoding from a peer without the extension: %q, %v", msgs, st)
	}
}
