package tunnel

import (
	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// The message and continuation frames a stream sends are built in place,
// in one value per stream, reused from chunk to chunk: clientDataFrame for
// requests, serverDataFrame for responses. Reuse is safe because a stream's
// messages go out one at a time, on the goroutine that sends them, and a
// frame is encoded by the time the outer stream's SendMsg returns; what the
// encoding still refers to after that (the chunk, see chunkEncoding) is
// held by a reference to its buffer, not by the frame.
//
// Each value embeds the generated message, so any protobuf codec encodes it
// as it would the bare message; the frame codec encodes it by hand and, for
// a chunk large enough, sends the chunk's bytes where they are, in owner,
// the buffer the request's or response's codec encoded it into.

// dataFramer builds the frames of one message, for sendMessage.
type dataFramer interface {
	// first is the message frame of a message of size bytes, carrying
	// chunk, which lies in owner.
	first(size uint32, chunk []byte, owner mem.Buffer) any
	// next is a continuation frame carrying chunk, which lies in owner.
	next(chunk []byte, owner mem.Buffer) any
	// forget drops the frame's hold on the last chunk, so that an idle
	// stream keeps no message alive.
	forget()
}

// clientDataFrame is the data frames of one stream's requests.
type clientDataFrame struct {
	tunnelpb.ClientToServer
	message tunnelpb.ClientToServer_RequestMessage
	md      tunnelpb.MessageData
	more    tunnelpb.ClientToServer_MoreRequestData
	owner   mem.Buffer // the buffer the chunk is in, nil if unknown
}

func (d *clientDataFrame) first(size uint32, chunk []byte, owner mem.Buffer) any {
	d.md.Size, d.md.Data = size, chunk
	d.message.RequestMessage = &d.md
	d.Frame, d.owner = &d.message, owner
	return d
}

func (d *clientDataFrame) next(chunk []byte, owner mem.Buffer) any {
	d.more.MoreRequestData = chunk
	d.Frame, d.owner = &d.more, owner
	return d
}

func (d *clientDataFrame) forget() {
	d.md.Data, d.more.MoreRequestData, d.owner = nil, nil, nil
}

// serverDataFrame is the data frames of one stream's responses.
type serverDataFrame struct {
	tunnelpb.ServerToClient
	message tunnelpb.ServerToClient_ResponseMessage
	md      tunnelpb.MessageData
	more    tunnelpb.ServerToClient_MoreResponseData
	owner   mem.Buffer // the buffer the chunk is in, nil if unknown
}

func (d *serverDataFrame) first(size uint32, chunk []byte, owner mem.Buffer) any {
	d.md.Size, d.md.Data = size, chunk
	d.message.ResponseMessage = &d.md
	d.Frame, d.owner = &d.message, owner
	return d
}

func (d *serverDataFrame) next(chunk []byte, owner mem.Buffer) any {
	d.more.MoreResponseData = chunk
	d.Frame, d.owner = &d.more, owner
	return d
}

func (d *serverDataFrame) forget() {
	d.md.Data, d.more.MoreResponseData, d.owner = nil, nil, nil
}
