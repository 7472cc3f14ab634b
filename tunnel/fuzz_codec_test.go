package tunnel

// FuzzFrameCodec: the frame codec against proto on arbitrary bytes; the
// frames and checks it shares with the codec tests are in
// frame_codec_test.go.

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func FuzzFrameCodec(f *testing.F) {
	for _, m := range codecFrames() {
		if b, err := proto.Marshal(m); err == nil && len(b) < 4096 {
			f.Add(b, uint16(len(b)/2), uint16(1))
		}
	}
	f.Add([]byte{0x1a, 0x05, 0x12, 0x01, 'x', 0x08, 0x01, 0x08, 0x07}, uint16(3), uint16(4))
	f.Fuzz(func(t *testing.T, b []byte, cut1, cut2 uint16) {
		for _, m := range []proto.Message{&tunnelpb.ClientToServer{}, &tunnelpb.ServerToClient{}} {
			checkDecode(t, splits(bytes.Clone(b), int(cut1), int(cut1)+int(cut2)), m)

			// What decodes re-encodes as proto.Marshal encodes it.
			got := m.ProtoReflect().New().Interface()
			if err := Codec().Unmarshal(splits(b), got); err != nil {
				continue
			}
			want, err := proto.Marshal(got)
			if err != nil {
				t.Fatal(err)
			}
			out, err := Codec().Marshal(got)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Materialize(), want) {
				t.Fatalf("re-encoding %v: %x, proto.Marshal: %x", got, out.Materialize(), want)
			}
			out.Free()
		}
	})
}
