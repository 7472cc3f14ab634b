package proxy_test

import (
	"bytes"
	"testing"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy"
	"github.com/grpctunnel/grpctunnel/proxy/proxypb"
	spb "google.golang.org/genproto/googleapis/rpc/status"
)

// labelled returns msg with label appended under field, as the proxy
// sends it.
func labelled(t testing.TB, msg []byte, field protowire.Number, label *proxypb.Label) []byte {
	t.Helper()
	body, err := proto.Marshal(label)
	if err != nil {
		t.Fatal(err)
	}
	b := protowire.AppendTag(bytes.Clone(msg), field, protowire.BytesType)
	return protowire.AppendBytes(b, body)
}

func TestSplitLabel(t *testing.T) {
	payload, err := proto.Marshal(&grpchantesting.Message{Payload: []byte("data"), Count: 7})
	if err != nil {
		t.Fatal(err)
	}
	label := &proxypb.Label{Backend: "b", Status: &spb.Status{Code: int32(codes.Aborted), Message: "m"}}

	t.Run("labelled", func(t *testing.T) {
		got, l, err := proxy.SplitLabel(labelled(t, payload, proxy.DefaultLabelField, label), proxy.DefaultLabelField)
		if err != nil || !bytes.Equal(got, payload) || !proto.Equal(l, label) {
			t.Errorf("got %x, %v, %v; want the payload and the label", got, l, err)
		}
	})
	t.Run("no label", func(t *testing.T) {
		for _, msg := range [][]byte{payload, nil, {}} {
			got, l, err := proxy.SplitLabel(msg, proxy.DefaultLabelField)
			if err != nil || l != nil || !bytes.Equal(got, msg) {
				t.Errorf("SplitLabel(%x) = %x, %v, %v; want it unchanged", msg, got, l, err)
			}
		}
	})
	t.Run("only a label", func(t *testing.T) {
		got, l, err := proxy.SplitLabel(labelled(t, nil, 5, label), 5)
		if err != nil || len(got) != 0 || !proto.Equal(l, label) {
			t.Errorf("got %x, %v, %v; want an empty payload and the label", got, l, err)
		}
	})
	t.Run("last one wins", func(t *testing.T) {
		// Behind two fanning-out proxies: the inner label stays in the
		// payload, the outer one comes out.
		inner := labelled(t, payload, proxy.DefaultLabelField, &proxypb.Label{Backend: "inner"})
		outer := &proxypb.Label{Backend: "outer"}
		got, l, err := proxy.SplitLabel(labelled(t, inner, proxy.DefaultLabelField, outer), proxy.DefaultLabelField)
		if err != nil || !bytes.Equal(got, inner) || !proto.Equal(l, outer) {
			t.Errorf("got %x, %v, %v; want the inner message and the outer label", got, l, err)
		}
	})
	t.Run("label in the middle", func(t *testing.T) {
		msg := labelled(t, []byte{0x08, 0x01}, 9, label)
		msg = append(msg, 0x10, 0x02)
		got, l, err := proxy.SplitLabel(msg, 9)
		if err != nil || !bytes.Equal(got, []byte{0x08, 0x01, 0x10, 0x02}) || !proto.Equal(l, label) {
			t.Errorf("got %x, %v, %v; want the fields around the label", got, l, err)
		}
	})
	t.Run("malformed", func(t *testing.T) {
		for name, msg := range map[string][]byte{
			"truncated tag":         {0x80},
			"field number zero":     {0x00, 0x01},
			"truncated length":      {0x0a},
			"length past the end":   {0x0a, 0x05, 0x01},
			"truncated varint":      {0x08, 0xff},
			"end group alone":       {0x0c},
			"label not bytes":       protowire.AppendVarint(protowire.AppendTag(nil, proxy.DefaultLabelField, protowire.VarintType), 1),
			"label not a Label":     protowire.AppendBytes(protowire.AppendTag(nil, proxy.DefaultLabelField, protowire.BytesType), []byte{0xff}),
			"garbage after a label": append(labelled(t, payload, proxy.DefaultLabelField, label), 0xff),
		} {
			if got, l, err := proxy.SplitLabel(msg, proxy.DefaultLabelField); err == nil {
				t.Errorf("%s: SplitLabel(%x) = %x, %v, nil; want an error", name, msg, got, l)
			}
		}
	})
}

// FuzzSplitLabel checks that SplitLabel never panics and that what it
// returns is consistent: without a label, the message unchanged; with one,
// a shorter well-formed payload that, labelled again, splits the same way.
func FuzzSplitLabel(f *testing.F) {
	payload, _ := proto.Marshal(&grpchantesting.Message{Payload: []byte("data"), Count: 7})
	label := &proxypb.Label{Backend: "b", Status: &spb.Status{Code: 3, Message: "m"}}
	f.Add(payload, uint32(proxy.DefaultLabelField))
	f.Add(labelled(f, payload, proxy.DefaultLabelField, label), uint32(proxy.DefaultLabelField))
	f.Add(labelled(f, nil, 1, label), uint32(1))
	f.Add(labelled(f, labelled(f, payload, 2, label), 2, label), uint32(2))
	f.Add([]byte{0x0a, 0x05, 0x01}, uint32(1))
	f.Add([]byte{0x0b, 0x08, 0x01, 0x0c}, uint32(1)) // a group
	f.Fuzz(func(t *testing.T, msg []byte, n uint32) {
		field := protowire.Number(n)
		got, l, err := proxy.SplitLabel(msg, field)
		if err != nil {
			return
		}
		if l == nil {
			if !bytes.Equal(got, msg) {
				t.Fatalf("no label, yet the payload %x differs from %x", got, msg)
			}
			return
		}
		if len(got) >= len(msg) {
			t.Fatalf("a label came out, yet the payload is %d bytes of %d", len(got), len(msg))
		}
		if !field.IsValid() {
			return // a label cannot be appended again under that number
		}
		again, l2, err := proxy.SplitLabel(labelled(t, got, field, l), field)
		if err != nil || !bytes.Equal(again, got) || !proto.Equal(l2, l) {
			t.Fatalf("relabelled: %x, %v, %v; want %x, %v", again, l2, err, got, l)
		}
	})
}
