package tunnel

// The frames of the tunnel protocol (PROTOCOL.md): building them, and
// measuring what they carry. Everything that sends or reads frames uses
// these, so this file uses nothing of the tunnel's but the generated types.

import (
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// framePayload is the tunneled message payload a frame carries: the bytes of
// a message or continuation chunk, 0 for any other frame.
func framePayload[F any](f F) int {
	switch f := any(f).(type) {
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

func closeFrame(id int64, st *status.Status, trailer *tunnelpb.Metadata) *tunnelpb.ServerToClient {
	return &tunnelpb.ServerToClient{
		StreamId: id,
		Frame: &tunnelpb.ServerToClient_CloseStream{CloseStream: &tunnelpb.CloseStream{
			ResponseTrailers: trailer,
			Status:           st.Proto(),
		}},
	}
}

// framer builds the frames of one direction of one stream.
type framer[F any] struct {
	message func(size uint32, chunk []byte) F
	more    func(chunk []byte) F
}

func clientFramer(id int64) framer[*tunnelpb.ClientToServer] {
	return framer[*tunnelpb.ClientToServer]{
		message: func(size uint32, chunk []byte) *tunnelpb.ClientToServer {
			return &tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_RequestMessage{
				RequestMessage: &tunnelpb.MessageData{Size: size, Data: chunk},
			}}
		},
		more: func(chunk []byte) *tunnelpb.ClientToServer {
			return &tunnelpb.ClientToServer{StreamId: id, Frame: &tunnelpb.ClientToServer_MoreRequestData{MoreRequestData: chunk}}
		},
	}
}

func serverFramer(id int64) framer[*tunnelpb.ServerToClient] {
	return framer[*tunnelpb.ServerToClient]{
		message: func(size uint32, chunk []byte) *tunnelpb.ServerToClient {
			return &tunnelpb.ServerToClient{StreamId: id, Frame: &tunnelpb.ServerToClient_ResponseMessage{
				ResponseMessage: &tunnelpb.MessageData{Size: size, Data: chunk},
			}}
		},
		more: func(chunk []byte) *tunnelpb.ServerToClient {
			return &tunnelpb.ServerToClient{StreamId: id, Frame: &tunnelpb.ServerToClient_MoreResponseData{MoreResponseData: chunk}}
		},
	}
}
