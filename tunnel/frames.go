package tunnel

// The frames of the tunnel protocol (PROTOCOL.md): building them, and
// measuring what they carry. Everything that sends or reads frames uses
// these, so this file uses nothing of the tunnel's but the generated types
// and the data frames that streams build in place (data_frames.go), which
// use nothing else either.

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// framePayload is the tunneled message payload a frame carries: the bytes of
// a message or continuation chunk, 0 for any other frame.
func framePayload(f any) int {
	switch f := f.(type) {
	case *clientDataFrame:
		return framePayload(&f.ClientToServer)
	case *serverDataFrame:
		return framePayload(&f.ServerToClient)
	case *tunnelpb.ClientToServer:
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ClientToServer_RequestMessage:
			return len(fr.RequestMessage.GetData())
		case *tunnelpb.ClientToServer_MoreRequestData:
			return len(fr.MoreRequestData)
		}
	case *tunnelpb.ServerToClient:
		switch fr := f.GetFrame().(type) {
		case *tunnelpb.ServerToClient_ResponseMessage:
			return len(fr.ResponseMessage.GetData())
		case *tunnelpb.ServerToClient_MoreResponseData:
			return len(fr.MoreResponseData)
		}
	}
	return 0
}

// emptyFrame is the payload of half_close and cancel frames.
var emptyFrame = &emptypb.Empty{}

// clientFramer builds the frames a tunnel client sends on one stream (on
// stream -1, settingsStreamID, the tunnel's own: keepalive pings and pongs,
// the request to close). Every ClientToServer frame is built here, each kind
// in one method.
type clientFramer int64

func (id clientFramer) newStream(ns *tunnelpb.NewStream) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: int64(id), Frame: &tunnelpb.ClientToServer_NewStream{NewStream: ns}}
}

func (id clientFramer) message(size uint32, chunk []byte) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: int64(id), Frame: &tunnelpb.ClientToServer_RequestMessage{
		RequestMessage: &tunnelpb.MessageData{Size: size, Data: chunk},
	}}
}

func (id clientFramer) more(chunk []byte) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: int64(id), Frame: &tunnelpb.ClientToServer_MoreRequestData{MoreRequestData: chunk}}
}

// windowUpdate grants the server n more bytes on the stream; on stream -1 it
// is a keepalive ping or pong.
func (id clientFramer) windowUpdate(n uint32) *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: int64(id), Frame: &tunnelpb.ClientToServer_WindowUpdate{WindowUpdate: n}}
}

func (id clientFramer) halfClose() *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: int64(id), Frame: &tunnelpb.ClientToServer_HalfClose{HalfClose: emptyFrame}}
}

// cancel ends the stream; on stream -1 it asks the peer to close the tunnel.
func (id clientFramer) cancel() *tunnelpb.ClientToServer {
	return &tunnelpb.ClientToServer{StreamId: int64(id), Frame: &tunnelpb.ClientToServer_Cancel{Cancel: emptyFrame}}
}

// closeTunnel, on stream -1, asks the peer to close the tunnel: a cancel.
func (id clientFramer) closeTunnel() *tunnelpb.ClientToServer {
	return id.cancel()
}

// serverFramer builds the frames a tunnel server sends on one stream (on
// stream -1, settingsStreamID, the tunnel's own: settings, keepalive pings
// and pongs, the drain signal, the request to close). Every ServerToClient
// frame is built here, each kind in one method.
type serverFramer int64

func (id serverFramer) settings(revs []tunnelpb.ProtocolRevision, window uint32) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: int64(id), Frame: &tunnelpb.ServerToClient_Settings{Settings: &tunnelpb.Settings{
		SupportedProtocolRevisions: revs,
		InitialWindowSize:          window,
	}}}
}

// headers is the response headers md; on stream -1, with empty md, the
// signal that the server drains.
func (id serverFramer) headers(md *tunnelpb.Metadata) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: int64(id), Frame: &tunnelpb.ServerToClient_ResponseHeaders{ResponseHeaders: md}}
}

func (id serverFramer) message(size uint32, chunk []byte) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: int64(id), Frame: &tunnelpb.ServerToClient_ResponseMessage{
		ResponseMessage: &tunnelpb.MessageData{Size: size, Data: chunk},
	}}
}

func (id serverFramer) more(chunk []byte) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: int64(id), Frame: &tunnelpb.ServerToClient_MoreResponseData{MoreResponseData: chunk}}
}

// windowUpdate grants the client n more bytes on the stream; on stream -1 it
// is a keepalive ping or pong.
func (id serverFramer) windowUpdate(n uint32) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{StreamId: int64(id), Frame: &tunnelpb.ServerToClient_WindowUpdate{WindowUpdate: n}}
}

// closeStream ends the stream with st and trailer; on stream -1 it asks the
// peer to close the tunnel.
func (id serverFramer) closeStream(st *status.Status, trailer *tunnelpb.Metadata) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{
		StreamId: int64(id),
		Frame: &tunnelpb.ServerToClient_CloseStream{CloseStream: &tunnelpb.CloseStream{
			ResponseTrailers: trailer,
			Status:           st.Proto(),
		}},
	}
}

// closeTunnel, on stream -1, asks the peer to close the tunnel: a
// close_stream with status OK and no trailer.
func (id serverFramer) closeTunnel() *tunnelpb.ServerToClient {
	return id.closeStream(status.New(codes.OK, ""), nil)
}

// closeFrame is serverFramer(id).closeStream(st, trailer).
func closeFrame(id int64, st *status.Status, trailer *tunnelpb.Metadata) *tunnelpb.ServerToClient {
	return serverFramer(id).closeStream(st, trailer)
}
