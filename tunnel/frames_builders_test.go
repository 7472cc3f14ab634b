package tunnel

// The frames tests send, built one way for every test: the protocol, hostile,
// limit and fuzz tests, and the fuzz seeds (whose bytes TestFzSeedFiles
// pins, so a builder changed here shows there). Message frames come from the
// production framers of frames.go; the rest, which production builds inline
// or never sends (a tunnel client's frames from the server's side, say), are
// here. A test that needs a malformed frame no builder makes writes it out.

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

var (
	rev0 = tunnelpb.ProtocolRevision_REVISION_ZERO
	rev1 = tunnelpb.ProtocolRevision_REVISION_ONE
)

// pbMetadata is the metadata of key-value pairs, one value a key.
func pbMetadata(kv ...string) *tunnelpb.Metadata {
	pb := &tunnelpb.Metadata{Md: map[string]*tunnelpb.Metadata_Values{}}
	for i := 0; i+1 < len(kv); i += 2 {
		pb.Md[kv[i]] = &tunnelpb.Metadata_Values{Val: []string{kv[i+1]}}
	}
	return pb
}

// Frames a tunnel client sends.

// newStreamFrame opens stream id; md, key-value pairs, are its request
// headers (none if empty).
func newStreamFrame(id int64, method string, rev tunnelpb.ProtocolRevision, window uint32, md ...string) *tunnelpb.ClientToServer {
	f := &tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_NewStream{NewStream: &tunnelpb.NewStream{
		MethodName:        method,
		ProtocolRevision:  rev,
		InitialWindowSize: window,
	}}}
	if len(md) > 0 {
		f.GetNewStream().RequestHeaders = pbMetadata(md...)
	}
	return f
}

func messageFrame(id int64, size uint32, data []byte) *tunnelpb.ClientToServer {
	return clientFramer(id).message(size, data)
}

func moreFrame(id int64, data []byte) *tunnelpb.ClientToServer {
	return clientFramer(id).more(data)
}

func halfCloseFrame(id int64) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_HalfClose{HalfClose: emptyFrame}}
}

func cancelFrame(id int64) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_Cancel{Cancel: emptyFrame}}
}

// windowUpdateFrame grants the server n bytes on stream id (on stream -1, a
// keepalive ping or pong).
func windowUpdateFrame(id int64, n uint32) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_WindowUpdate{WindowUpdate: n}}
}

// Frames a tunnel server sends.

// serverSettingsFrame is a tunnel server's settings, on stream id (-1 but
// in tests of a wrong one).
func serverSettingsFrame(id int64, window uint32, revs ...tunnelpb.ProtocolRevision) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: id, Frame: &tunnelpb.ServerToClient_Settings{Settings: &tunnelpb.Settings{
		SupportedProtocolRevisions: revs,
		InitialWindowSize:          window,
	}}}
}

func responseFrame(id int64, size uint32, data []byte) *tunnelpb.ServerToClient {
	return serverFramer(id).message(size, data)
}

func moreResponseFrame(id int64, data []byte) *tunnelpb.ServerToClient {
	return serverFramer(id).more(data)
}

func headersFrame(id int64, md *tunnelpb.Metadata) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: id, Frame: &tunnelpb.ServerToClient_ResponseHeaders{ResponseHeaders: md}}
}

// closeCodeFrame closes stream id with code, "closed by the test" and
// trailers.
func closeCodeFrame(id int64, code codes.Code, trailers *tunnelpb.Metadata) *tunnelpb.ServerToClient {
	return closeFrame(id, status.New(code, "closed by the test"), trailers)
}

// serverWindowUpdateFrame grants the client n bytes on stream id (on
// stream -1, a keepalive ping or pong).
func serverWindowUpdateFrame(id int64, n uint32) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: id, Frame: &tunnelpb.ServerToClient_WindowUpdate{WindowUpdate: n}}
}

// Whole messages.

// messageFrames is the frames of one message b, cut in chunks of at most
// limit bytes: a message frame, then continuations.
func messageFrames[F any](fr framer[F], b []byte, limit int) []F {
	var out []F
	size := uint32(len(b))
	for first := true; first || len(b) > 0; first = false {
		n := min(len(b), limit)
		if first {
			out = append(out, fr.message(size, b[:n]))
		} else {
			out = append(out, fr.more(b[:n]))
		}
		b = b[n:]
	}
	return out
}

// requestFrames is the frames of a request holding value (a BytesValue), in
// chunks of at most chunk bytes (16 KiB if chunk is not given).
func requestFrames(id int64, value []byte, chunk ...int) []*tunnelpb.ClientToServer {
	return messageFrames(clientFramer(id), marshalValue(value), chunkLimit(chunk))
}

// responseFrames is requestFrames for a response.
func responseFrames(id int64, value []byte, chunk ...int) []*tunnelpb.ServerToClient {
	return messageFrames(serverFramer(id), marshalValue(value), chunkLimit(chunk))
}

func chunkLimit(chunk []int) int {
	if len(chunk) > 0 {
		return chunk[0]
	}
	return flowcontrol.MaxChunk
}

func marshalValue(value []byte) []byte {
	b, err := proto.Marshal(bytesValue(value))
	if err != nil {
		panic(err)
	}
	return b
}

// receiveEncoded hands fr to a tunnel end's reader as the outer stream
// would: encoded, split in two buffers (so that message data spans both),
// and decoded by the frame codec into m, the reader's received frame.
func receiveEncoded(m any, fr proto.Message) error {
	b, err := proto.Marshal(fr)
	if err != nil {
		return err
	}
	return Codec().Unmarshal(splits(b, len(b)/2), m)
}

// sentDecoded is what a peer reads of m, a frame that a tunnel end sends:
// its encoding by the frame codec, decoded by protobuf into into.
func sentDecoded(m any, into proto.Message) error {
	data, err := Codec().Marshal(m)
	if err != nil {
		return err
	}
	defer data.Free()
	return proto.Unmarshal(data.Materialize(), into)
}

// framer builds the frames of one message of one direction of one stream,
// as a new frame each (not in place, as a stream's data frames are): a
// message frame, then continuations. clientFramer and serverFramer are the
// two.
type framer[F any] interface {
	message(size uint32, chunk []byte) F
	more(chunk []byte) F
}

// bytesChunk is a received chunk of one piece that owns its bytes.
func bytesChunk(b []byte) chunk {
	if len(b) == 0 {
		return chunk{}
	}
	return chunk{pieces: []piece{{data: b}}, len: len(b)}
}
