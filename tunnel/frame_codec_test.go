package tunnel

import (
	"bytes"
	"math"
	"testing"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

func bytesOf(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

// codecFrames are frames of every kind, hot or not, with edge cases.
func codecFrames() []proto.Message {
	var out []proto.Message
	ids := []int64{0, 1, 2, 127, 128, 1 << 40, math.MaxInt64, -1, math.MinInt64}
	for _, id := range ids {
		out = append(out,
			&tunnelpb.ClientToServer{StreamId: id},
			&tunnelpb.ServerToClient{StreamId: id},
			windowUpdateFrame(id, 65535),
			serverWindowUpdateFrame(id, 1),
			halfCloseFrame(id),
			cancelFrame(id),
			moreFrame(id, bytesOf(10)),
			responseFrame(id, 100, bytesOf(100)),
		)
	}
	for _, w := range []uint32{0, 1, 127, 128, 1 << 16, math.MaxUint32} {
		out = append(out,
			windowUpdateFrame(3, w),
			serverWindowUpdateFrame(3, w),
		)
	}
	// Sizes around the small-frame and pooling thresholds, and big chunks.
	for _, n := range []int{0, 1, 15, 16, 17, 20, 29, 30, 31, 32, 33, 127, 128, 1000, 1010, 1011, 1012, 1013, 1020, 1024, 1025, 4096, 16 << 10, 64<<10 + 3, 1 << 20} {
		for _, size := range []uint32{0, uint32(n), math.MaxUint32} {
			out = append(out,
				messageFrame(5, size, bytesOf(n)),
				responseFrame(5, size, bytesOf(n)),
			)
		}
		out = append(out,
			moreFrame(5, bytesOf(n)),
			moreResponseFrame(5, bytesOf(n)),
		)
	}
	out = append(out,
		// Nil messages and nil bytes in the oneof.
		&tunnelpb.ClientToServer{StreamId: 1, Frame: &tunnelpb.ClientToServer_RequestMessage{}},
		&tunnelpb.ServerToClient{StreamId: 1, Frame: &tunnelpb.ServerToClient_ResponseMessage{}},
		&tunnelpb.ClientToServer{StreamId: 1, Frame: &tunnelpb.ClientToServer_HalfClose{}},
		&tunnelpb.ClientToServer{StreamId: 1, Frame: &tunnelpb.ClientToServer_Cancel{}},
		&tunnelpb.ClientToServer{StreamId: 1, Frame: &tunnelpb.ClientToServer_MoreRequestData{}},
		&tunnelpb.ServerToClient{StreamId: 1, Frame: &tunnelpb.ServerToClient_MoreResponseData{}},
		&tunnelpb.ClientToServer{Frame: &tunnelpb.ClientToServer_RequestMessage{RequestMessage: &tunnelpb.MessageData{}}},
		// The frames the proto codec encodes.
		newStreamFrame(9, "/a.B/C", rev1, 65536, "k", "v"),
		serverSettingsFrame(-1, 65536, 0, 1),
		headersFrame(9, &tunnelpb.Metadata{}),
		&tunnelpb.ServerToClient{StreamId: 9, Frame: &tunnelpb.ServerToClient_CloseStream{CloseStream: &tunnelpb.CloseStream{}}},
		// Other messages.
		wrapperspb.String("not a frame"),
		&tunnelpb.MessageData{Size: 3, Data: []byte("abc")},
	)
	// Unknown fields, which only the proto codec keeps.
	withUnknown := windowUpdateFrame(2, 1)
	withUnknown.ProtoReflect().SetUnknown(protowire.AppendTag(nil, 99, protowire.VarintType))
	unknownInData := &tunnelpb.MessageData{Size: 1, Data: []byte{1}}
	unknownInData.ProtoReflect().SetUnknown([]byte{0x18, 1})
	unknownInEmpty := &emptypb.Empty{}
	unknownInEmpty.ProtoReflect().SetUnknown([]byte{0x18, 1})
	out = append(out, withUnknown,
		&tunnelpb.ServerToClient{StreamId: 2, Frame: &tunnelpb.ServerToClient_ResponseMessage{ResponseMessage: unknownInData}},
		&tunnelpb.ClientToServer{StreamId: 2, Frame: &tunnelpb.ClientToServer_Cancel{Cancel: unknownInEmpty}},
	)
	return out
}

// isHot tells whether the codec encodes m itself.
func isHot(m proto.Message) bool {
	switch m := m.(type) {
	case *tunnelpb.ClientToServer:
		_, ok := clientHotFrame(m)
		return ok
	case *tunnelpb.ServerToClient:
		_, ok := serverHotFrame(m)
		return ok
	}
	return false
}

// splits returns data cut into buffers at cuts.
func splits(data []byte, cuts ...int) mem.BufferSlice {
	var s mem.BufferSlice
	prev := 0
	for _, c := range cuts {
		if c < prev || c > len(data) {
			continue
		}
		s = append(s, mem.SliceBuffer(data[prev:c]))
		prev = c
	}
	return append(s, mem.SliceBuffer(data[prev:]))
}

// checkDecode decodes data with the frame codec and with proto.Unmarshal
// into fresh messages like want and fails unless they agree.
func checkDecode(t testing.TB, data mem.BufferSlice, want proto.Message) {
	t.Helper()
	b := data.Materialize()
	ours := want.ProtoReflect().New().Interface()
	theirs := want.ProtoReflect().New().Interface()
	errOurs := Codec().Unmarshal(data, ours)
	errTheirs := proto.Unmarshal(b, theirs)
	if (errOurs == nil) != (errTheirs == nil) {
		t.Fatalf("decoding %x: frame codec says %v, proto says %v", b, errOurs, errTheirs)
	}
	if errOurs != nil {
		return
	}
	if !proto.Equal(ours, theirs) {
		t.Fatalf("decoding %x: frame codec got %v, proto got %v", b, ours, theirs)
	}
	if !sameNilBytes(ours, theirs) {
		t.Fatalf("decoding %x: nil and empty bytes differ from proto's", b)
	}
	// Nothing refers to the input any more.
	for _, buf := range data {
		clear(buf.ReadOnlyData())
	}
	if !proto.Equal(ours, theirs) {
		t.Fatalf("decoding %x: the decoded message shares the input's bytes", b)
	}
}

// sameNilBytes tells whether the bytes fields of two equal frames are nil
// alike, as far as the frame codec decodes them.
func sameNilBytes(a, b proto.Message) bool {
	var x, y []byte
	switch a := a.(type) {
	case *tunnelpb.ClientToServer:
		b := b.(*tunnelpb.ClientToServer)
		switch {
		case a.GetRequestMessage() != nil:
			x, y = a.GetRequestMessage().Data, b.GetRequestMessage().Data
		case a.GetMoreRequestData() != nil || b.GetMoreRequestData() != nil:
			x, y = a.GetMoreRequestData(), b.GetMoreRequestData()
		}
	case *tunnelpb.ServerToClient:
		b := b.(*tunnelpb.ServerToClient)
		switch {
		case a.GetResponseMessage() != nil:
			x, y = a.GetResponseMessage().Data, b.GetResponseMessage().Data
		case a.GetMoreResponseData() != nil || b.GetMoreResponseData() != nil:
			x, y = a.GetMoreResponseData(), b.GetMoreResponseData()
		}
	}
	return (x == nil) == (y == nil)
}

func TestFrameCodecMatchesProto(t *testing.T) {
	c := Codec()
	if c.Name() != "proto" {
		t.Fatalf("Name() = %q", c.Name())
	}
	hot := 0
	for _, m := range codecFrames() {
		want, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.Marshal(m)
		if err != nil {
			t.Fatalf("Marshal(%v): %v", m, err)
		}
		if b := got.Materialize(); !bytes.Equal(b, want) {
			t.Fatalf("Marshal(%v) = %x, proto.Marshal = %x", m, b, want)
		}
		got.Free()
		if isHot(m) {
			hot++
		}

		checkDecode(t, splits(bytes.Clone(want)), m)
		if len(want) <= 64 {
			for i := 0; i <= len(want); i++ {
				for j := i; j <= len(want); j++ {
					checkDecode(t, splits(bytes.Clone(want), i, j), m)
				}
			}
		} else {
			n := len(want)
			checkDecode(t, splits(bytes.Clone(want), 1, 2, 3, n/2, n-1), m)
			checkDecode(t, splits(bytes.Clone(want), 5, 5, n/3, 2*n/3), m)
			checkDecode(t, splits(bytes.Clone(want), 16<<10, 32<<10), m)
		}
	}
	if hot < 100 {
		t.Fatalf("only %d frames took the codec's own path", hot)
	}
}

// TestFrameCodecHotPath checks that the frames of the data path are decoded
// without the proto codec, in any field order.
func TestFrameCodecHotPath(t *testing.T) {
	for _, m := range codecFrames() {
		if !isHot(m) {
			continue
		}
		b, _ := proto.Marshal(m)
		if _, ok := decodeHotFrame(splits(b), isClientFrame(m), nil); !ok {
			t.Fatalf("%v (%x) was left to the proto codec", m, b)
		}
	}
	// The oneof first, the stream ID after; data before size.
	b := []byte{0x1a, 0x05, 0x12, 0x01, 'x', 0x08, 0x01, 0x08, 0x07}
	h, ok := decodeHotFrame(splits(b), true, nil)
	if !ok || h.streamID != 7 || h.field != fieldMessage || h.size != 1 || string(h.data) != "x" {
		t.Fatalf("reordered frame: %+v, %v", h, ok)
	}
	checkDecode(t, splits(b), &tunnelpb.ClientToServer{})
}

func isClientFrame(m proto.Message) bool {
	_, ok := m.(*tunnelpb.ClientToServer)
	return ok
}

// TestFrameCodecUnusualEncodings decodes valid and invalid encodings that
// proto.Marshal does not produce; the frame codec must agree with
// proto.Unmarshal on all of them.
func TestFrameCodecUnusualEncodings(t *testing.T) {
	tag := func(n protowire.Number, typ protowire.Type) []byte { return protowire.AppendTag(nil, n, typ) }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	vint := func(v uint64) []byte { return protowire.AppendVarint(nil, v) }
	lenp := func(b []byte) []byte { return protowire.AppendBytes(nil, b) }
	md := cat(tag(1, protowire.VarintType), vint(3), tag(2, protowire.BytesType), lenp([]byte("abc")))
	cases := map[string][]byte{
		"empty":                  nil,
		"stream id twice":        cat(tag(1, 0), vint(5), tag(7, 0), vint(9), tag(1, 0), vint(6)),
		"window before id":       cat(tag(7, 0), vint(9), tag(1, 0), vint(6)),
		"unknown varint":         cat(tag(1, 0), vint(5), tag(99, 0), vint(1), tag(7, 0), vint(9)),
		"unknown bytes":          cat(tag(1, 0), vint(5), tag(7, 0), vint(9), tag(12345, 2), lenp([]byte("zz"))),
		"unknown in data":        cat(tag(3, 2), lenp(cat(md, tag(3, 0), vint(1)))),
		"data before size":       cat(tag(3, 2), lenp(cat(tag(2, 2), lenp([]byte("x")), tag(1, 0), vint(1)))),
		"size twice":             cat(tag(3, 2), lenp(cat(md, tag(1, 0), vint(4)))),
		"data twice":             cat(tag(3, 2), lenp(cat(md, tag(2, 2), lenp(nil)))),
		"message twice merges":   cat(tag(3, 2), lenp(md), tag(3, 2), lenp(cat(tag(2, 2), lenp([]byte("d"))))),
		"message then more":      cat(tag(3, 2), lenp(md), tag(4, 2), lenp([]byte("more"))),
		"more then message":      cat(tag(4, 2), lenp([]byte("more")), tag(3, 2), lenp(md)),
		"more twice":             cat(tag(4, 2), lenp([]byte("a")), tag(4, 2), lenp([]byte("b"))),
		"window twice":           cat(tag(7, 0), vint(1), tag(7, 0), vint(2)),
		"half close then cancel": cat(tag(5, 2), lenp(nil), tag(6, 2), lenp(nil)),
		"empty with a field":     cat(tag(5, 2), lenp(cat(tag(1, 0), vint(1)))),
		"window over 32 bits":    cat(tag(7, 0), vint(1<<40+5)),
		"window as bytes":        cat(tag(7, 2), lenp([]byte{1})),
		"id as bytes":            cat(tag(1, 2), lenp([]byte{1})),
		"more as varint":         cat(tag(4, 0), vint(1)),
		"overlong tag":           cat([]byte{0x88, 0x80, 0x00}, vint(1)),
		"overlong id":            cat(tag(1, 0), []byte{0x81, 0x80, 0x80, 0x00}),
		"ten-byte id":            cat(tag(1, 0), vint(math.MaxUint64)),
		"eleven-byte id":         cat(tag(1, 0), bytes.Repeat([]byte{0xff}, 10), []byte{1}),
		"id overflow":            cat(tag(1, 0), bytes.Repeat([]byte{0xff}, 9), []byte{2}),
		"truncated id":           cat(tag(1, 0), []byte{0x80}),
		"truncated tag":          {0x80},
		"truncated length":       cat(tag(4, 2), []byte{0x80}),
		"length past end":        cat(tag(4, 2), vint(5), []byte("abc")),
		"huge length":            cat(tag(4, 2), vint(math.MaxUint64)),
		"data past message":      cat(tag(3, 2), vint(3), tag(2, 2), vint(3), []byte("abc")),
		"varint past message":    cat(tag(3, 2), vint(2), tag(1, 0), []byte{0x80, 0x01}),
		"field zero":             cat(tag(0, 0), vint(1)),
		"end group":              cat(tag(7, protowire.EndGroupType)),
		"group":                  cat(tag(9, protowire.StartGroupType), tag(9, protowire.EndGroupType)),
		"big field number":       cat(vint(uint64(protowire.MaxValidNumber+1)<<3), vint(1)),
		"new stream":             cat(tag(1, 0), vint(1), tag(2, 2), lenp(cat(tag(1, 2), lenp([]byte("/a/b"))))),
		"settings":               cat(tag(6, 2), lenp(nil)),
		"close stream":           cat(tag(5, 2), lenp(nil)),
		"headers":                cat(tag(2, 2), lenp(nil)),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			for _, m := range []proto.Message{&tunnelpb.ClientToServer{}, &tunnelpb.ServerToClient{}} {
				checkDecode(t, splits(bytes.Clone(b)), m)
				for i := 0; i <= len(b); i++ {
					checkDecode(t, splits(bytes.Clone(b), i), m)
				}
			}
		})
	}
}

// TestFrameCodecResets checks that decoding replaces what the message held,
// as proto.Unmarshal does.
func TestFrameCodecResets(t *testing.T) {
	m := &tunnelpb.ClientToServer{StreamId: 4, Frame: &tunnelpb.ClientToServer_Cancel{Cancel: &emptypb.Empty{}}}
	m.ProtoReflect().SetUnknown([]byte{0x18, 1})
	b, _ := proto.Marshal(&tunnelpb.ClientToServer{Frame: &tunnelpb.ClientToServer_WindowUpdate{WindowUpdate: 3}})
	if err := Codec().Unmarshal(splits(b), m); err != nil {
		t.Fatal(err)
	}
	if want := (&tunnelpb.ClientToServer{Frame: &tunnelpb.ClientToServer_WindowUpdate{WindowUpdate: 3}}); !proto.Equal(m, want) {
		t.Fatalf("got %v, want %v", m, want)
	}
}

// TestFrameCodecOtherMessages checks that messages other than frames go to
// the proto codec, errors included.
func TestFrameCodecOtherMessages(t *testing.T) {
	c := Codec()
	if _, err := c.Marshal("not a message"); err == nil {
		t.Fatal("Marshal of a string succeeded")
	}
	if err := c.Unmarshal(nil, new(int)); err == nil {
		t.Fatal("Unmarshal into an int succeeded")
	}
	b, err := c.Marshal(wrapperspb.Bytes(bytesOf(5000)))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Free()
	var got wrapperspb.BytesValue
	if err := c.Unmarshal(b, &got); err != nil || !bytes.Equal(got.Value, bytesOf(5000)) {
		t.Fatalf("round trip of another message: %v", err)
	}
	if encoding.GetCodecV2(grpcproto.Name) == nil {
		t.Fatal("no proto codec")
	}
}

func BenchmarkFrameCodec(b *testing.B) {
	frames := []struct {
		name  string
		frame proto.Message
		new   func() any
	}{
		{"request_message_1KiB", &tunnelpb.ClientToServer{StreamId: 3, Frame: &tunnelpb.ClientToServer_RequestMessage{
			RequestMessage: &tunnelpb.MessageData{Size: 1 << 10, Data: bytesOf(1 << 10)}}},
			func() any { return new(tunnelpb.ClientToServer) }},
		{"more_data_16KiB", &tunnelpb.ServerToClient{StreamId: 3, Frame: &tunnelpb.ServerToClient_MoreResponseData{
			MoreResponseData: bytesOf(16 << 10)}},
			func() any { return new(tunnelpb.ServerToClient) }},
		{"window_update", windowUpdateFrame(3, 1<<16),
			func() any { return new(tunnelpb.ClientToServer) }},
	}
	codecs := []struct {
		name  string
		codec encoding.CodecV2
	}{
		{"proto", encoding.GetCodecV2(grpcproto.Name)},
		{"frame", Codec()},
	}
	for _, f := range frames {
		enc, _ := proto.Marshal(f.frame)
		// gRPC hands a message over in buffers of at most 16 KiB.
		var in mem.BufferSlice
		for rest := enc; len(rest) > 0; {
			n := min(len(rest), 16<<10)
			in = append(in, mem.SliceBuffer(rest[:n]))
			rest = rest[n:]
		}
		for _, c := range codecs {
			b.Run("Marshal/"+f.name+"/"+c.name, func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					out, err := c.codec.Marshal(f.frame)
					if err != nil {
						b.Fatal(err)
					}
					out.Free()
				}
			})
			b.Run("Unmarshal/"+f.name+"/"+c.name, func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if err := c.codec.Unmarshal(in, f.new()); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
