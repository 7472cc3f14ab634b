package tunnel

import (
	"encoding/binary"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// Codec returns the codec for a *grpc.Server that accepts tunnels:
//
//	grpc.NewServer(grpc.ForceServerCodecV2(tunnel.Codec()))
//
// It encodes tunnel frames (tunnelpb.ClientToServer and
// tunnelpb.ServerToClient) without reflection and hands every other message
// to gRPC's proto codec, so the server's other services are unaffected. Its
// name is "proto" and what it writes is exactly what the proto codec writes,
// so peers see standard protobuf. The ends that open tunnels (NewChannel,
// ReverseTunnelServer) use it for their opening RPC on their own.
//
// The codec handles any message, so it can also be the fallback of another
// codec.
func Codec() encoding.CodecV2 { return frameCodecV2 }

// frameCodecV2 is the codec Codec returns.
var frameCodecV2 encoding.CodecV2 = &frameCodec{fallback: encoding.GetCodecV2(proto.Name)}

// frameCodec encodes the frames of the outer stream by hand. Only the
// frames of the data path are handled here (message data, window updates,
// half-close, cancel); everything else, and anything it cannot decode as one
// of those shapes, goes to fallback, gRPC's proto codec. The fallback is
// taken from the registry when the package initializes, before anyone else
// can register a codec named "proto".
type frameCodec struct {
	fallback encoding.CodecV2
}

// withFrameCodec adds the frame codec to the options of an opening RPC,
// last so that it wins over a codec among them, without touching opts.
func withFrameCodec(opts []grpc.CallOption) []grpc.CallOption {
	return append(opts[:len(opts):len(opts)], forceFrameCodec)
}

var forceFrameCodec grpc.CallOption = grpc.ForceCodecV2(frameCodecV2)

func (c *frameCodec) Name() string { return proto.Name }

// Field numbers of ClientToServer and ServerToClient. The frames the codec
// handles have the same numbers on both sides.
const (
	fieldStreamID    protowire.Number = 1
	fieldMessage     protowire.Number = 3 // request_message, response_message
	fieldMoreData    protowire.Number = 4 // more_request_data, more_response_data
	fieldHalfClose   protowire.Number = 5 // ClientToServer only
	fieldCancel      protowire.Number = 6 // ClientToServer only
	fieldWindow      protowire.Number = 7
	fieldMessageSize protowire.Number = 1 // MessageData.size
	fieldMessageData protowire.Number = 2 // MessageData.data
)

// hotFrame is a frame the codec encodes itself, in wire terms.
type hotFrame struct {
	streamID int64
	field    protowire.Number // the oneof's field; 0 for none
	size     uint32           // MessageData.size, or the window update
	data     []byte           // MessageData.data, or more data
}

func (c *frameCodec) Marshal(v any) (mem.BufferSlice, error) {
	var h hotFrame
	var ok bool
	var owner mem.Buffer
	switch m := v.(type) {
	case *clientDataFrame:
		h, ok = clientHotFrame(&m.ClientToServer)
		owner, v = m.owner, &m.ClientToServer
	case *serverDataFrame:
		h, ok = serverHotFrame(&m.ServerToClient)
		owner, v = m.owner, &m.ServerToClient
	case *tunnelpb.ClientToServer:
		h, ok = clientHotFrame(m)
	case *tunnelpb.ServerToClient:
		h, ok = serverHotFrame(m)
	}
	if !ok {
		return c.fallback.Marshal(v)
	}
	return h.encode(owner), nil
}

func clientHotFrame(m *tunnelpb.ClientToServer) (hotFrame, bool) {
	if m == nil || len(m.ProtoReflect().GetUnknown()) != 0 {
		return hotFrame{}, false
	}
	h := hotFrame{streamID: m.StreamId}
	switch f := m.Frame.(type) {
	case nil:
	case *tunnelpb.ClientToServer_RequestMessage:
		h.field = fieldMessage
		return h, h.setMessage(f.RequestMessage)
	case *tunnelpb.ClientToServer_MoreRequestData:
		h.field, h.data = fieldMoreData, f.MoreRequestData
	case *tunnelpb.ClientToServer_WindowUpdate:
		h.field, h.size = fieldWindow, f.WindowUpdate
	case *tunnelpb.ClientToServer_HalfClose:
		h.field = fieldHalfClose
		return h, emptyIsEmpty(f.HalfClose)
	case *tunnelpb.ClientToServer_Cancel:
		h.field = fieldCancel
		return h, emptyIsEmpty(f.Cancel)
	default:
		return hotFrame{}, false
	}
	return h, true
}

func serverHotFrame(m *tunnelpb.ServerToClient) (hotFrame, bool) {
	if m == nil || len(m.ProtoReflect().GetUnknown()) != 0 {
		return hotFrame{}, false
	}
	h := hotFrame{streamID: m.StreamId}
	switch f := m.Frame.(type) {
	case nil:
	case *tunnelpb.ServerToClient_ResponseMessage:
		h.field = fieldMessage
		return h, h.setMessage(f.ResponseMessage)
	case *tunnelpb.ServerToClient_MoreResponseData:
		h.field, h.data = fieldMoreData, f.MoreResponseData
	case *tunnelpb.ServerToClient_WindowUpdate:
		h.field, h.size = fieldWindow, f.WindowUpdate
	default:
		return hotFrame{}, false
	}
	return h, true
}

// setMessage takes the fields of md; a nil md encodes as an empty message,
// as in proto.Marshal.
func (h *hotFrame) setMessage(md *tunnelpb.MessageData) bool {
	if md == nil {
		return true
	}
	if len(md.ProtoReflect().GetUnknown()) != 0 {
		return false
	}
	h.size, h.data = md.Size, md.Data
	return true
}

func emptyIsEmpty(e *emptypb.Empty) bool {
	return e == nil || len(e.ProtoReflect().GetUnknown()) == 0
}

// messageDataLen is the encoded length of the MessageData in h.
func (h *hotFrame) messageDataLen() int {
	n := 0
	if h.size != 0 {
		n += 1 + protowire.SizeVarint(uint64(h.size))
	}
	if len(h.data) != 0 {
		n += 1 + protowire.SizeBytes(len(h.data))
	}
	return n
}

// encode writes h as proto.Marshal writes the message: fields in order of
// their numbers, fields of implicit presence left out when zero, the oneof's
// field always written. owner, if not nil, is the buffer h's data lies in.
func (h *hotFrame) encode(owner mem.Buffer) mem.BufferSlice {
	return encodeFrame(h, h.encodedLen(), owner)
}

// encodedLen is the length of h's encoding.
func (h *hotFrame) encodedLen() int {
	n := 0
	if h.streamID != 0 {
		n += 1 + protowire.SizeVarint(uint64(h.streamID))
	}
	inner := 0
	switch h.field {
	case fieldMessage:
		inner = h.messageDataLen()
		n += 1 + protowire.SizeBytes(inner)
	case fieldMoreData:
		n += 1 + protowire.SizeBytes(len(h.data))
	case fieldHalfClose, fieldCancel:
		n += 2
	case fieldWindow:
		n += 1 + protowire.SizeVarint(uint64(h.size))
	}
	return n
}

// appendTo appends h's encoding to b, whose capacity must hold it; without
// withData it leaves out the bytes of h.data (not their length), which end
// the encoding of a message or continuation frame.
func (h *hotFrame) appendTo(b []byte, withData bool) []byte {
	if h.streamID != 0 {
		b = append(b, byte(protowire.EncodeTag(fieldStreamID, protowire.VarintType)))
		b = protowire.AppendVarint(b, uint64(h.streamID))
	}
	switch h.field {
	case fieldMessage:
		b = append(b, byte(protowire.EncodeTag(fieldMessage, protowire.BytesType)))
		b = protowire.AppendVarint(b, uint64(h.messageDataLen()))
		if h.size != 0 {
			b = append(b, byte(protowire.EncodeTag(fieldMessageSize, protowire.VarintType)))
			b = protowire.AppendVarint(b, uint64(h.size))
		}
		if len(h.data) != 0 {
			b = append(b, byte(protowire.EncodeTag(fieldMessageData, protowire.BytesType)))
			b = appendData(b, h.data, withData)
		}
	case fieldMoreData:
		b = append(b, byte(protowire.EncodeTag(fieldMoreData, protowire.BytesType)))
		b = appendData(b, h.data, withData)
	case fieldHalfClose, fieldCancel:
		b = append(b, byte(protowire.EncodeTag(h.field, protowire.BytesType)), 0)
	case fieldWindow:
		b = append(b, byte(protowire.EncodeTag(fieldWindow, protowire.VarintType)))
		b = protowire.AppendVarint(b, uint64(h.size))
	}
	return b
}

// appendData appends the length of data, then data itself if with.
func appendData(b, data []byte, with bool) []byte {
	if with {
		return protowire.AppendBytes(b, data)
	}
	return protowire.AppendVarint(b, uint64(len(data)))
}

func (c *frameCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *receivedClientFrame:
		if m.decode(data) {
			return nil
		}
		return c.fallback.Unmarshal(data, &m.ClientToServer)
	case *receivedServerFrame:
		if m.decode(data) {
			return nil
		}
		return c.fallback.Unmarshal(data, &m.ServerToClient)
	case *tunnelpb.ClientToServer:
		if m != nil && decodeClientFrame(data, m) {
			return nil
		}
	case *tunnelpb.ServerToClient:
		if m != nil && decodeServerFrame(data, m) {
			return nil
		}
	}
	return c.fallback.Unmarshal(data, v)
}

// The frames decodeClientFrame and decodeServerFrame build, each with the
// message inside its oneof wrapper in one allocation.
type (
	decodedRequestMessage struct {
		f  tunnelpb.ClientToServer_RequestMessage
		md tunnelpb.MessageData
	}
	decodedResponseMessage struct {
		f  tunnelpb.ServerToClient_ResponseMessage
		md tunnelpb.MessageData
	}
	decodedHalfClose struct {
		f tunnelpb.ClientToServer_HalfClose
		e emptypb.Empty
	}
	decodedCancel struct {
		f tunnelpb.ClientToServer_Cancel
		e emptypb.Empty
	}
)

func decodeClientFrame(data mem.BufferSlice, m *tunnelpb.ClientToServer) bool {
	h, ok := decodeHotFrame(data, true, nil)
	if !ok {
		return false
	}
	*m = tunnelpb.ClientToServer{StreamId: h.streamID}
	switch h.field {
	case fieldMessage:
		f := new(decodedRequestMessage)
		f.md.Size, f.md.Data = h.size, h.data
		f.f.RequestMessage = &f.md
		m.Frame = &f.f
	case fieldMoreData:
		m.Frame = &tunnelpb.ClientToServer_MoreRequestData{MoreRequestData: h.data}
	case fieldWindow:
		m.Frame = &tunnelpb.ClientToServer_WindowUpdate{WindowUpdate: h.size}
	case fieldHalfClose:
		f := new(decodedHalfClose)
		f.f.HalfClose = &f.e
		m.Frame = &f.f
	case fieldCancel:
		f := new(decodedCancel)
		f.f.Cancel = &f.e
		m.Frame = &f.f
	}
	return true
}

func decodeServerFrame(data mem.BufferSlice, m *tunnelpb.ServerToClient) bool {
	h, ok := decodeHotFrame(data, false, nil)
	if !ok {
		return false
	}
	*m = tunnelpb.ServerToClient{StreamId: h.streamID}
	switch h.field {
	case fieldMessage:
		f := new(decodedResponseMessage)
		f.md.Size, f.md.Data = h.size, h.data
		f.f.ResponseMessage = &f.md
		m.Frame = &f.f
	case fieldMoreData:
		m.Frame = &tunnelpb.ServerToClient_MoreResponseData{MoreResponseData: h.data}
	case fieldWindow:
		m.Frame = &tunnelpb.ServerToClient_WindowUpdate{WindowUpdate: h.size}
	}
	return true
}

// decodeHotFrame decodes a frame the codec handles itself. It reports false
// for anything else, valid or not: another frame kind, an unknown field, a
// second frame in the oneof (which proto.Unmarshal would merge or replace),
// a malformed encoding. The caller then leaves the whole buffer to the proto
// codec, which has the last word on what it means.
//
// Without into, bytes come out as proto.Unmarshal leaves them: copied,
// MessageData.data nil when empty, more data empty but not nil. With into,
// they are not copied: into gets views of data's buffers, each with a
// reference of its own, and h.data stays nil. On failure into may hold
// pieces already, which the caller frees.
func decodeHotFrame(data mem.BufferSlice, client bool, into *chunk) (h hotFrame, ok bool) {
	r := frameReader{into: into}
	r.init(data)
	for r.left > 0 {
		tag, ok := r.varint()
		if !ok {
			return h, false
		}
		num, typ := protowire.DecodeTag(tag)
		switch {
		case num == fieldStreamID && typ == protowire.VarintType:
			v, ok := r.varint()
			if !ok {
				return h, false
			}
			h.streamID = int64(v)
			continue
		case h.field != 0:
			return h, false
		}
		switch {
		case num == fieldWindow && typ == protowire.VarintType:
			v, ok := r.varint()
			if !ok {
				return h, false
			}
			h.field, h.size = fieldWindow, uint32(v)
		case typ != protowire.BytesType:
			return h, false
		case num == fieldMessage:
			n, ok := r.length()
			if !ok || !r.messageData(&h, n) {
				return h, false
			}
			h.field = fieldMessage
		case num == fieldMoreData:
			n, ok := r.length()
			if !ok {
				return h, false
			}
			h.field = fieldMoreData
			if into != nil {
				r.views(n)
				continue
			}
			if h.data = r.bytes(n); h.data == nil {
				h.data = []byte{}
			}
		case client && (num == fieldHalfClose || num == fieldCancel):
			// An Empty with fields is an Empty with unknown fields.
			if n, ok := r.length(); !ok || n != 0 {
				return h, false
			}
			h.field = num
		default:
			return h, false
		}
	}
	return h, true
}

// frameReader reads an encoding that may be split across the buffers of a
// buffer slice, without joining them first.
type frameReader struct {
	cur  []byte          // the unread bytes of the current buffer
	buf  mem.Buffer      // the current buffer
	rest mem.BufferSlice // the buffers after it
	left int             // unread bytes in all
	// into, if not nil, receives message data as views (see views)
	// rather than copies.
	into *chunk
}

func (r *frameReader) init(data mem.BufferSlice) {
	r.rest = data
	r.left = data.Len()
}

// fill makes cur non-empty, unless nothing is left.
func (r *frameReader) fill() {
	for len(r.cur) == 0 && len(r.rest) > 0 {
		r.buf = r.rest[0]
		r.cur = r.buf.ReadOnlyData()
		r.rest = r.rest[1:]
	}
}

func (r *frameReader) varint() (uint64, bool) {
	if len(r.cur) == 0 {
		r.fill()
	}
	if len(r.cur) > 0 && r.cur[0] < 0x80 {
		v := uint64(r.cur[0])
		r.cur = r.cur[1:]
		r.left--
		return v, true
	}
	v, n := protowire.ConsumeVarint(r.cur)
	if n > 0 {
		r.cur = r.cur[n:]
		r.left -= n
		return v, true
	}
	if len(r.cur) >= binary.MaxVarintLen64 || len(r.rest) == 0 {
		return 0, false
	}
	// The varint may continue in the next buffers.
	var tmp [binary.MaxVarintLen64]byte
	k := copy(tmp[:], r.cur)
	for _, b := range r.rest {
		if k == len(tmp) {
			break
		}
		k += copy(tmp[k:], b.ReadOnlyData())
	}
	if v, n = protowire.ConsumeVarint(tmp[:k]); n < 0 {
		return 0, false
	}
	r.skip(n)
	return v, true
}

// length reads the length of a bytes field, which must fit in what is left.
func (r *frameReader) length() (int, bool) {
	v, ok := r.varint()
	if !ok || v > uint64(r.left) {
		return 0, false
	}
	return int(v), true
}

func (r *frameReader) skip(n int) {
	r.left -= n
	for n > 0 {
		r.fill()
		k := min(n, len(r.cur))
		r.cur = r.cur[k:]
		n -= k
	}
}

// bytes copies the next n bytes, which must be there; nil for none.
func (r *frameReader) bytes(n int) []byte {
	if n == 0 {
		return nil
	}
	r.fill()
	if n <= len(r.cur) {
		// append rather than make: the bytes are copied over, not zeroed first.
		b := append([]byte(nil), r.cur[:n]...)
		r.cur = r.cur[n:]
		r.left -= n
		return b
	}
	b := make([]byte, n)
	for k := 0; k < n; {
		r.fill()
		c := copy(b[k:], r.cur)
		r.cur = r.cur[c:]
		k += c
	}
	r.left -= n
	return b
}

// views adds the next n bytes, which must be there, to r.into as views of
// the buffers that hold them, taking a reference to each buffer: the bytes
// outlive the Unmarshal call without being copied.
func (r *frameReader) views(n int) {
	r.left -= n
	for n > 0 {
		r.fill()
		k := min(n, len(r.cur))
		r.buf.Ref()
		r.into.add(piece{data: r.cur[:k:k], owner: r.buf})
		r.cur = r.cur[k:]
		n -= k
	}
}

// messageData reads the n bytes of a MessageData into h.
func (r *frameReader) messageData(h *hotFrame, n int) bool {
	end := r.left - n
	h.size, h.data = 0, nil
	for r.left > end {
		tag, ok := r.varint()
		if !ok {
			return false
		}
		switch num, typ := protowire.DecodeTag(tag); {
		case num == fieldMessageSize && typ == protowire.VarintType:
			v, ok := r.varint()
			if !ok {
				return false
			}
			h.size = uint32(v)
		case num == fieldMessageData && typ == protowire.BytesType:
			k, ok := r.length()
			if !ok || k > r.left-end {
				return false
			}
			if r.into != nil {
				// A repeated field replaces the earlier one, as in
				// proto.Unmarshal.
				r.into.free()
				r.views(k)
				continue
			}
			h.data = r.bytes(k)
		default:
			return false
		}
	}
	// A varint that ran past the end of the message makes it malformed.
	return r.left == end
}
