package tunnel

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// FuzzTunnelServer and FuzzTunnelClient feed one end of a tunnel an arbitrary
// sequence of frames from its peer, over an in-memory outer stream (no
// network, so an input costs well under a millisecond), then end the outer
// stream. Whatever the frames, the end must not panic, must not hang (every
// wait here is bounded, and a wait that runs out fails the input), must
// leave no goroutine behind once the tunnel is over, must give back every
// byte it charged to the tunnel's buffer budget, and what it sends must obey
// the protocol (fzWire lists the checks).
//
// An input is a flags byte, a second flags byte, then frames, each a uvarint
// length followed by that many bytes of a protobuf-encoded frame
// (ClientToServer for the server, ServerToClient for the client). A frame
// that does not decode is skipped; a length beyond the input takes the rest.
// See fzEncode, the seeds (fzServerSeeds, fzClientSeeds) and testdata/fuzz.
//
// This file holds what the two targets share: the input, the waits, the leak
// and wire checks, the seeds' format. Each target, with its in-memory outer
// stream and its seeds, is in fuzz_server_test.go and fuzz_client_test.go;
// FuzzFrameCodec is in fuzz_codec_test.go.
//
// Run them with, for instance,
//
//	go test ./tunnel -run '^$' -fuzz '^FuzzTunnelServer$' -fuzztime 60s -fuzzminimizetime 1s
//
// Without -fuzzminimizetime the engine may spend up to a minute minimizing
// each new input it finds, fuzzing nothing meanwhile.

// Flags, first byte.
const (
	fzNegotiated  = 1 << iota // both ends sent the negotiate header: settings, revision one
	fzBinaryMD                // binary-metadata extension
	fzTunnelClose             // tunnel-close extension
	fzReverse                 // a reverse tunnel
	fzBigChunks               // max-chunk extension at 64 KiB
	fzBrokenEnd               // the outer stream ends with an error, not a clean end
	fzDrain                   // drain the tunnel before the outer stream ends
	fzTightLimits             // small limits: 2 streams, 64 KiB buffered, 100000-byte messages, 1 KiB metadata
)

// Flags, second byte.
const (
	fzKeepalive     = 1 << iota // keepalive extension
	fzKeepaliveFast             // keepalive extension, pinging after 1ms and giving up 2ms later
	fzSmallWindows              // receive windows of 1 KiB (4 KiB at most), so that small inputs exercise flow control
	fzCompression               // compression extension
)

// fzMaxFrames bounds the frames of one input.
const fzMaxFrames = 256

// fzInput is a decoded fuzz input.
type fzInput struct {
	flags, flags2 byte
	frames        [][]byte
}

func (in fzInput) has(flag byte) bool { return in.flags&flag != 0 }

func fzSplit(data []byte) fzInput {
	var in fzInput
	if len(data) > 0 {
		in.flags, data = data[0], data[1:]
	}
	if len(data) > 0 {
		in.flags2, data = data[0], data[1:]
	}
	for len(data) > 0 && len(in.frames) < fzMaxFrames {
		n, k := binary.Uvarint(data)
		if k <= 0 {
			in.frames = append(in.frames, data)
			break
		}
		data = data[k:]
		n = min(n, uint64(len(data)))
		in.frames = append(in.frames, data[:n])
		data = data[n:]
	}
	return in
}

// fzEncode builds an input from flags and frames.
func fzEncode(flags, flags2 byte, frames ...proto.Message) []byte {
	out := []byte{flags, flags2}
	for _, f := range frames {
		b, err := proto.Marshal(f)
		if err != nil {
			panic(err)
		}
		out = binary.AppendUvarint(out, uint64(len(b)))
		out = append(out, b...)
	}
	return out
}

// agreement and options of the end under test.
func (in fzInput) agreement() agreement {
	a := agreement{
		negotiated:     in.has(fzNegotiated),
		binaryMetadata: in.has(fzBinaryMD),
		tunnelClose:    in.has(fzTunnelClose),
		keepalive:      in.flags2&(fzKeepalive|fzKeepaliveFast) != 0,
		compression:    in.flags2&fzCompression != 0,
		maxChunk:       flowcontrol.MaxChunk,
	}
	if in.has(fzBigChunks) {
		a.maxChunk = 64 << 10
	}
	return a
}

func (in fzInput) options() *options {
	var opts []TunnelOption
	if in.has(fzTightLimits) {
		opts = append(opts, WithMaxConcurrentStreams(2), WithMaxBufferedBytes(64<<10),
			WithMaxRecvMsgSize(100_000), WithMaxHeaderListSize(1024))
	}
	if in.flags2&fzKeepaliveFast != 0 {
		opts = append(opts, WithKeepalive(time.Millisecond, 2*time.Millisecond))
	}
	if in.flags2&fzSmallWindows != 0 {
		opts = append(opts, WithInitialWindowSize(1024), WithMaxWindowSize(4096))
	}
	return newOptions(opts)
}

func (in fzInput) end() error {
	if in.has(fzBrokenEnd) {
		return errors.New("fz: outer stream broken")
	}
	return io.EOF
}

// fzWait is how long any one wait of the harness may take before the input
// counts as a hang.
const fzWait = 10 * time.Second

// fzAwait polls cond until it holds or d passes, and reports whether it held.
func fzAwait(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for spins := 0; !cond(); spins++ {
		if time.Now().After(deadline) {
			return false
		}
		if spins < 1000 {
			runtime.Gosched()
		} else {
			time.Sleep(50 * time.Microsecond)
		}
	}
	return true
}

// fzSettle waits briefly for the ends' goroutines to have nothing left to do
// but wait for frames: idle must hold on several looks in a row. It gives up
// quietly, since a goroutine may legitimately stay busy.
func fzSettle(idle func() bool) {
	calm := 0
	fzAwait(100*time.Millisecond, func() bool {
		if idle() {
			calm++
		} else {
			calm = 0
		}
		return calm >= 3
	})
}

// fzGoroutines returns the stacks of live goroutines.
func fzGoroutines() []string {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Split(string(buf[:n]), "\n\n")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// fzCheckLeaks fails the input if goroutines it started are still running
// this package's code once its tunnel is over. before is the number of
// goroutines there were before the input: when the count is back there,
// which is the common case and costs nothing to check, nothing leaked.
// Otherwise it waits for the count to come down, then looks at stacks.
func fzCheckLeaks(t *testing.T, before int) {
	if fzAwait(time.Second, func() bool { return runtime.NumGoroutine() <= before }) {
		return
	}
	var leaked []string
	if !fzAwait(fzWait, func() bool {
		leaked = leaked[:0]
		for i, g := range fzGoroutines() {
			// The first is this goroutine's own.
			if i > 0 && strings.Contains(g, "grpctunnel/grpctunnel/tunnel.") {
				leaked = append(leaked, g)
			}
		}
		return len(leaked) == 0
	}) {
		t.Fatalf("goroutines left behind:\n\n%s", strings.Join(leaked, "\n\n"))
	}
}

// fzWithin waits for ch to close or deliver, failing the input as a hang if
// it takes longer than fzWait.
func fzWithin[T any](t *testing.T, ch <-chan T, what string) {
	timer := time.NewTimer(fzWait)
	defer timer.Stop()
	select {
	case <-ch:
	case <-timer.C:
		fzHang(t, what)
	}
}

// fzHang fails the input as a hang, with every goroutine's stack.
func fzHang(t *testing.T, what string) {
	t.Fatalf("hang: %s after %v\n\n%s", what, fzWait, strings.Join(fzGoroutines(), "\n\n"))
}

// fzStreamOut follows what one end sent on one stream, to check it.
type fzStreamOut struct {
	active     bool // a message is in progress
	remaining  int  // its bytes still to come
	sent       int64
	closed     bool // close_stream (server) sent
	halfClosed bool // half_close (client) sent
}

// fzWire checks the frames one end sends. It knows what the peer's frames
// delivered so far allow: which streams exist, and how much window each
// direction was given.
type fzWire struct {
	mu        sync.Mutex
	problems  []string
	frames    int
	maxChunk  int
	streams   map[int64]*fzStreamOut
	flowCtl   map[int64]bool  // streams under flow control
	credit    map[int64]int64 // window given by the peer: initial plus updates
	maxOpened int64           // highest stream the checks allow frames for
}

func newFzWire(maxChunk int) *fzWire {
	return &fzWire{maxChunk: maxChunk, streams: map[int64]*fzStreamOut{}, flowCtl: map[int64]bool{}, credit: map[int64]int64{}}
}

func (w *fzWire) problem(format string, args ...any) {
	if len(w.problems) < 20 {
		w.problems = append(w.problems, fmt.Sprintf(format, args...))
	}
}

func (w *fzWire) stream(id int64) *fzStreamOut {
	s := w.streams[id]
	if s == nil {
		s = &fzStreamOut{}
		w.streams[id] = s
	}
	return s
}

// data checks a message chunk: first is a message frame of size bytes.
func (w *fzWire) data(id int64, first bool, size uint32, chunk []byte) {
	s := w.stream(id)
	if len(chunk) > w.maxChunk {
		w.problem("stream %d: chunk of %d bytes, more than the agreed %d", id, len(chunk), w.maxChunk)
	}
	if first {
		if s.active {
			w.problem("stream %d: message started before the previous one ended", id)
		}
		if len(chunk) > int(size) {
			w.problem("stream %d: first chunk of %d bytes overruns the declared size %d", id, len(chunk), size)
		}
		s.remaining = int(size) - len(chunk)
	} else {
		if !s.active {
			w.problem("stream %d: data with no message started", id)
		}
		if len(chunk) > s.remaining {
			w.problem("stream %d: chunk of %d bytes overruns the %d left of the message", id, len(chunk), s.remaining)
		}
		s.remaining -= len(chunk)
	}
	s.active = s.remaining > 0
	s.sent += int64(len(chunk))
	if w.flowCtl[id] && s.sent > w.credit[id] {
		w.problem("stream %d: %d bytes sent against a window of %d", id, s.sent, w.credit[id])
	}
}

func (w *fzWire) report(t *testing.T) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.problems) > 0 {
		t.Fatalf("protocol broken by this end:\n%s", strings.Join(w.problems, "\n"))
	}
}

// fzMarshal encodes a frame as gRPC would before sending it, which catches
// frames that could not travel (strings that are not UTF-8, say). Message
// data holds no string, and is skipped to save copying it.
func fzMarshal(m proto.Message, data bool) error {
	if data {
		return nil
	}
	_, err := proto.Marshal(m)
	return err
}

// fzStuck reports whether a stream without flow control holds more than its
// share of messages, which makes the tunnel's reader wait for its consumer
// (PROTOCOL.md, revision zero): an idle consumer then stalls the reader, as
// designed, until the network client goes away.
func fzStuck(ins []*inbound) bool {
	for _, in := range ins {
		in.mu.Lock()
		stuck := in.win == nil && in.queued > in.hold && in.err == nil
		in.mu.Unlock()
		if stuck {
			return true
		}
	}
	return false
}

// fzSeq flattens frames and groups of frames.
func fzSeq[F proto.Message](parts ...any) []proto.Message {
	var out []proto.Message
	for _, p := range parts {
		switch x := p.(type) {
		case F:
			out = append(out, x)
		case []F:
			for _, f := range x {
				out = append(out, f)
			}
		default:
			panic(fmt.Sprintf("fzSeq: %T", p))
		}
	}
	return out
}

type fzSeed struct {
	name          string
	flags, flags2 byte
	frames        []proto.Message
	onDisk        bool // committed under testdata/fuzz; otherwise added with f.Add
}

func (s fzSeed) bytes() []byte { return fzEncode(s.flags, s.flags2, s.frames...) }

// fzGzip compresses b as a peer using the compression extension would.
func fzGzip(b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	_, _ = w.Write(b)
	_ = w.Close()
	return buf.Bytes()
}

// fzSeedFile is a seed in the corpus file format of go test -fuzz.
func fzSeedFile(data []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", data)
}

// TestFzSeedFiles checks that the seeds committed under testdata/fuzz are
// the ones fzServerSeeds and fzClientSeeds describe; with
// GRPCTUNNEL_WRITE_FUZZ_SEEDS=1 it writes them instead. Files the fuzzer
// adds there (inputs that once failed) are left alone.
func TestFzSeedFiles(t *testing.T) {
	write := os.Getenv("GRPCTUNNEL_WRITE_FUZZ_SEEDS") == "1"
	for target, seeds := range map[string][]fzSeed{
		"FuzzTunnelServer": fzServerSeeds(),
		"FuzzTunnelClient": fzClientSeeds(),
	} {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, s := range seeds {
			if !s.onDisk {
				continue
			}
			path := filepath.Join(dir, "seed-"+s.name)
			want := fzSeedFile(s.bytes())
			if write {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, want, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (regenerate with GRPCTUNNEL_WRITE_FUZZ_SEEDS=1)", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s is stale (regenerate with GRPCTUNNEL_WRITE_FUZZ_SEEDS=1)", path)
			}
		}
	}
}
