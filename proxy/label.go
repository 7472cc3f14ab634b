package proxy

import (
	"fmt"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/grpctunnel/grpctunnel/proxy/proxypb"
)

// DefaultLabelField is the field number under which a fanned-out response
// carries its grpctunnel.proxy.v1.Label unless [WithLabelField] says
// otherwise. It is the largest field number protobuf allows, so no real
// message is likely to use it.
const DefaultLabelField protowire.Number = protowire.MaxValidNumber

// WithLabelField makes the proxy label fanned-out responses under field
// number n instead of [DefaultLabelField], for a client whose messages
// already use that number or whose fan-out view declares the label under
// another one. n must be a valid protobuf field number (1 to 536870911,
// outside the reserved 19000 to 19999); WithLabelField panics otherwise,
// since that is a programming error.
func WithLabelField(n protowire.Number) Option {
	if !n.IsValid() || (n >= protowire.FirstReservedNumber && n <= protowire.LastReservedNumber) {
		panic(fmt.Sprintf("proxy: WithLabelField(%d): not a valid protobuf field number (1 to %d, outside %d to %d)",
			n, protowire.MaxValidNumber, protowire.FirstReservedNumber, protowire.LastReservedNumber))
	}
	return func(o *options) { o.labelField = n }
}

// labelFor returns the field, tag and length included, that labels the
// responses of the backend named name; with st, it labels the one response
// that reports the backend's failure.
func labelFor(field protowire.Number, name string, st *status.Status) []byte {
	l := &proxypb.Label{Backend: name}
	if st != nil {
		l.Status = st.Proto()
	}
	body, err := proto.Marshal(l)
	if err != nil {
		// A Label is a string and a Status whose details are already
		// serialized Anys: marshalling it cannot fail.
		panic("proxy: marshalling a label: " + err.Error())
	}
	b := make([]byte, 0, protowire.SizeTag(field)+protowire.SizeBytes(len(body)))
	b = protowire.AppendTag(b, field, protowire.BytesType)
	return protowire.AppendBytes(b, body)
}

// SplitLabel separates a fanned-out response, as a client receives it
// without knowing the response's schema, into the backend's own message and
// the label the proxy added under field (DefaultLabelField unless the proxy
// was configured otherwise). It returns msg unchanged and a nil label if msg
// has no such field, and an error if msg is not a well-formed protobuf
// message or the label is malformed.
//
// The label is the last occurrence of field at the top level of msg: the
// proxy appends it after the backend's bytes. Earlier occurrences stay in
// payload, so behind two fanning-out proxies in a row each SplitLabel peels
// one label, the outer proxy's first. payload shares msg's memory when the
// label ends msg, as it does in what the proxy sends.
func SplitLabel(msg []byte, field protowire.Number) (payload []byte, label *proxypb.Label, err error) {
	start, end := -1, -1
	var body []byte
	for off := 0; off < len(msg); {
		num, typ, n := protowire.ConsumeTag(msg[off:])
		if n < 0 {
			return nil, nil, fmt.Errorf("proxy: malformed message at byte %d: %w", off, protowire.ParseError(n))
		}
		m := protowire.ConsumeFieldValue(num, typ, msg[off+n:])
		if m < 0 {
			return nil, nil, fmt.Errorf("proxy: malformed field %d at byte %d: %w", num, off, protowire.ParseError(m))
		}
		if num == field {
			if typ != protowire.BytesType {
				return nil, nil, fmt.Errorf("proxy: label field %d has wire type %d, not bytes", num, typ)
			}
			// ConsumeFieldValue has checked the length prefix already.
			v, _ := protowire.ConsumeBytes(msg[off+n : off+n+m])
			start, end, body = off, off+n+m, v
		}
		off += n + m
	}
	if start < 0 {
		return msg, nil, nil
	}
	label = new(proxypb.Label)
	if err := proto.Unmarshal(body, label); err != nil {
		return nil, nil, fmt.Errorf("proxy: malformed label: %w", err)
	}
	if end == len(msg) {
		return msg[:start:start], label, nil
	}
	payload = make([]byte, 0, len(msg)-(end-start))
	payload = append(payload, msg[:start]...)
	return append(payload, msg[end:]...), label, nil
}
