package proxy

import (
	"fmt"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Field numbers of Talos's one-to-many convention (its common.proto):
//
//	message SomeResponse { repeated SomeReply messages = 1; }
//	message SomeReply { common.Metadata metadata = 1; ... }
//	message Metadata {
//	  string hostname = 1;
//	  string error = 2;
//	  google.rpc.Status status = 3;
//	}
const (
	talosReplies  protowire.Number = 1 // SomeResponse.messages
	talosMetadata protowire.Number = 1 // SomeReply.metadata
	talosHostname protowire.Number = 1 // Metadata.hostname
	talosError    protowire.Number = 2 // Metadata.error
	talosStatus   protowire.Number = 3 // Metadata.status
)

// TalosResponder returns the [Responder] for services that follow the
// convention of Talos's apid and siderolabs/grpc-proxy, so that their
// clients (talosctl, or any client generated from Talos's .proto files)
// work unchanged behind this proxy. Under that convention a unary method's
// response is a repeated field 1 of replies, and a streaming method's
// responses are replies themselves; every reply's field 1 is a
// common.Metadata whose hostname (field 1) names the node the reply came
// from, and whose error (field 2, the error's text) and status (field 3, a
// google.rpc.Status) report a node's failure.
//
// The responder works on the wire, without the services' schemas, as
// siderolabs/grpc-proxy does:
//
//   - Each reply gets a metadata with the [Backend]'s Name as hostname,
//     appended to its bytes. A metadata the backend set itself is merged
//     with it, as a parser merges repeated occurrences of a message field,
//     so the hostname is the proxy's and the other fields stay.
//   - A backend's failure becomes a reply holding only a metadata with
//     hostname, error and status (a unary method's wrapped in a response).
//   - A unary call (a [Route] with Unary set) gets one response: the
//     concatenation of every backend's responses and failures, which is a
//     valid response whose replies are all of theirs.
//
// A unary response that is not a well-formed message, or whose field 1 is
// not length-delimited, does not follow the convention: it fails that
// backend, which is reported like any failure.
func TalosResponder() *Responder {
	return &Responder{Message: talosMessage, Failure: talosFailure, Merge: talosMerge}
}

// talosMessage appends the hostname metadata to each reply of msg: to msg
// itself for a streaming method, to every field 1 of msg for a unary one.
func talosMessage(b Backend, unary bool, msg []byte) ([]byte, error) {
	md := talosMetadataField(b.Name, nil)
	if !unary {
		return append(msg, md...), nil
	}
	out := make([]byte, 0, len(msg)+4*len(md))
	for off := 0; off < len(msg); {
		num, typ, n := protowire.ConsumeTag(msg[off:])
		if n < 0 {
			return nil, fmt.Errorf("talos: malformed response at byte %d: %w", off, protowire.ParseError(n))
		}
		m := protowire.ConsumeFieldValue(num, typ, msg[off+n:])
		if m < 0 {
			return nil, fmt.Errorf("talos: malformed field %d at byte %d: %w", num, off, protowire.ParseError(m))
		}
		field := msg[off : off+n+m]
		off += n + m
		if num != talosReplies {
			out = append(out, field...) // not a reply: kept as it is
			continue
		}
		if typ != protowire.BytesType {
			return nil, fmt.Errorf("talos: response field %d has wire type %d, not a repeated message", num, typ)
		}
		// ConsumeFieldValue has checked the length prefix already.
		reply, _ := protowire.ConsumeBytes(field[n:])
		out = protowire.AppendTag(out, talosReplies, protowire.BytesType)
		out = protowire.AppendVarint(out, uint64(len(reply)+len(md)))
		out = append(out, reply...)
		out = append(out, md...)
	}
	return out, nil
}

// talosFailure is the reply, wrapped in a response for a unary method,
// that reports b's failure with st.
func talosFailure(b Backend, unary bool, st *status.Status) []byte {
	reply := talosMetadataField(b.Name, st)
	if !unary {
		return reply
	}
	out := protowire.AppendTag(nil, talosReplies, protowire.BytesType)
	return protowire.AppendBytes(out, reply)
}

// talosMerge concatenates the responses: repeated fields concatenate, so
// the result is one response holding every reply.
func talosMerge(msgs [][]byte) ([]byte, error) {
	n := 0
	for _, m := range msgs {
		n += len(m)
	}
	out := make([]byte, 0, n)
	for _, m := range msgs {
		out = append(out, m...)
	}
	return out, nil
}

// talosMetadataField returns a reply's metadata field, tag included, for
// the node named hostname and, with st, its failure. The error text is
// what Talos puts there, the Go error's (status.Error's) text.
func talosMetadataField(hostname string, st *status.Status) []byte {
	var md []byte
	if hostname != "" { // proto3 leaves an empty string out
		md = protowire.AppendTag(md, talosHostname, protowire.BytesType)
		md = protowire.AppendString(md, hostname)
	}
	if st != nil {
		if err := st.Err(); err != nil { // nil for OK, which no failure is
			md = protowire.AppendTag(md, talosError, protowire.BytesType)
			md = protowire.AppendString(md, err.Error())
		}
		body, err := proto.Marshal(st.Proto())
		if err != nil {
			// A Status is numbers, a string and already serialized Anys:
			// marshalling it cannot fail.
			panic("proxy: marshalling a status: " + err.Error())
		}
		md = protowire.AppendTag(md, talosStatus, protowire.BytesType)
		md = protowire.AppendBytes(md, body)
	}
	out := protowire.AppendTag(nil, talosMetadata, protowire.BytesType)
	return protowire.AppendBytes(out, md)
}
