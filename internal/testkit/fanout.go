package testkit

import (
	"context"
	"io"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
)

// FanOut calls grpchantesting's Unary method as server-streaming on conn,
// with each of keys as a value of header (a value may itself list several
// agents, comma-separated), as a caller fanning out through a gateway
// does, with the payload "ping". It returns the payload of each labelled
// result by the agent that gave it, or the name of its status code if it
// failed, and fails the test if the call fails as a whole or a result
// carries no label.
func FanOut(t testing.TB, conn grpc.ClientConnInterface, header string, keys ...string) map[string]string {
	t.Helper()
	var kv []string
	for _, k := range keys {
		kv = append(kv, header, k)
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), kv...)
	cs, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/grpchantesting.TestService/Unary", grpc.ForceCodecV2(proxy.Codec()))
	if err != nil {
		t.Fatal(err)
	}
	// The proxy's codec sends typed messages with the proto codec and
	// receives frames as raw bytes.
	if err := cs.SendMsg(&grpchantesting.Message{Payload: []byte("ping")}); err != nil {
		t.Fatal(err)
	}
	_ = cs.CloseSend()
	got := make(map[string]string)
	for {
		f := new(proxy.Frame)
		if err := cs.RecvMsg(f); err != nil {
			if err != io.EOF {
				t.Fatalf("the call failed as a whole: %v", err)
			}
			return got
		}
		payload, label, err := proxy.SplitLabel(f.Bytes(), proxy.DefaultLabelField)
		if err != nil || label == nil {
			t.Fatalf("result without a label: %v %v", label, err)
		}
		if label.GetStatus() != nil {
			got[label.GetBackend()] = codes.Code(label.GetStatus().GetCode()).String()
			continue
		}
		var m grpchantesting.Message
		if err := proto.Unmarshal(payload, &m); err != nil {
			t.Fatal(err)
		}
		got[label.GetBackend()] = string(m.GetPayload())
	}
}
