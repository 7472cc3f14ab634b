package tunnel

import (
	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// A tunnel end's reader receives every frame into one value of its own,
// reused from frame to frame: receivedClientFrame on the end that handles
// calls, receivedServerFrame on the end that issues them. Each embeds the
// generated message, so it is itself a proto.Message (through the embedded
// ProtoReflect) and any codec that decodes protobuf fills it as it would
// the bare message; the frame codec (Codec) instead decodes the frames of
// the data path by hand, into fields kept here rather than allocated, and
// leaves message data in gRPC's receive buffers (see chunk), uncopied.
//
// The reader owns the value: what it dispatches must not keep a pointer
// into it past the dispatch, and what keeps message data takes a reference
// of its own (inbound does).

// receivedFrame is what receiveFrames needs of the two.
type receivedFrame interface {
	// payload is the data of a message or continuation frame; empty for
	// any other frame.
	payload() *chunk
	// reset frees what the last frame held, before the next is read.
	reset()
}

// receivedData is the message data of the frame last received, which both
// kinds of received frame hold the same way.
type receivedData struct {
	data    chunk
	decoded bool // data is set: the frame codec decoded the frame by hand
}

// payloadOf returns the data; for a frame that protobuf decoded, it is
// message or more, the bytes that protobuf put in the frame (nil for a
// frame that carries none).
func (r *receivedData) payloadOf(message, more []byte) *chunk {
	if !r.decoded {
		r.decoded = true
		r.data.add(piece{data: message})
		r.data.add(piece{data: more})
	}
	return &r.data
}

func (r *receivedData) reset() {
	r.data.free()
	r.decoded = false
}

// receivedClientFrame is a ClientToServer as the end that handles calls
// receives it.
type receivedClientFrame struct {
	tunnelpb.ClientToServer
	receivedData

	message   tunnelpb.ClientToServer_RequestMessage
	md        tunnelpb.MessageData
	more      tunnelpb.ClientToServer_MoreRequestData
	window    tunnelpb.ClientToServer_WindowUpdate
	halfClose tunnelpb.ClientToServer_HalfClose
	cancel    tunnelpb.ClientToServer_Cancel
}

// decode decodes a frame of the data path into f by hand, reporting false
// for any other (f is then for protobuf to fill).
func (f *receivedClientFrame) decode(data mem.BufferSlice) bool {
	f.reset()
	h, ok := decodeHotFrame(data, true, &f.data)
	if !ok {
		f.data.free()
		return false
	}
	f.ClientToServer = tunnelpb.ClientToServer{StreamId: h.streamID}
	switch h.field {
	case fieldMessage:
		f.md = tunnelpb.MessageData{Size: h.size}
		f.message.RequestMessage = &f.md
		f.Frame = &f.message
	case fieldMoreData:
		f.Frame = &f.more
	case fieldWindow:
		f.window.WindowUpdate = h.size
		f.Frame = &f.window
	case fieldHalfClose:
		f.halfClose.HalfClose = emptyFrame
		f.Frame = &f.halfClose
	case fieldCancel:
		f.cancel.Cancel = emptyFrame
		f.Frame = &f.cancel
	}
	f.decoded = true
	return true
}

func (f *receivedClientFrame) payload() *chunk {
	return f.payloadOf(f.GetRequestMessage().GetData(), f.GetMoreRequestData())
}

// receivedServerFrame is a ServerToClient as the end that issues calls
// receives it.
type receivedServerFrame struct {
	tunnelpb.ServerToClient
	receivedData

	message tunnelpb.ServerToClient_ResponseMessage
	md      tunnelpb.MessageData
	more    tunnelpb.ServerToClient_MoreResponseData
	window  tunnelpb.ServerToClient_WindowUpdate
}

// decode decodes a frame of the data path into f by hand, reporting false
// for any other (f is then for protobuf to fill).
func (f *receivedServerFrame) decode(data mem.BufferSlice) bool {
	f.reset()
	h, ok := decodeHotFrame(data, false, &f.data)
	if !ok {
		f.data.free()
		return false
	}
	f.ServerToClient = tunnelpb.ServerToClient{StreamId: h.streamID}
	switch h.field {
	case fieldMessage:
		f.md = tunnelpb.MessageData{Size: h.size}
		f.message.ResponseMessage = &f.md
		f.Frame = &f.message
	case fieldMoreData:
		f.Frame = &f.more
	case fieldWindow:
		f.window.WindowUpdate = h.size
		f.Frame = &f.window
	}
	f.decoded = true
	return true
}

func (f *receivedServerFrame) payload() *chunk {
	return f.payloadOf(f.GetResponseMessage().GetData(), f.GetMoreResponseData())
}
