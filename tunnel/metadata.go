package tunnel

import (
	"encoding/base64"
	"strings"
	"unicode/utf8"

	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// reservedHeaders are keys that gRPC itself owns. They never travel as
// tunneled metadata in either direction: a caller cannot use them to steer
// the peer, and a peer cannot use them to confuse a handler. The deadline
// travels as grpc-timeout, but only as this package writes it.
var reservedHeaders = map[string]bool{
	"content-type":            true,
	"user-agent":              true,
	"te":                      true,
	"grpc-timeout":            true,
	"grpc-status":             true,
	"grpc-message":            true,
	"grpc-status-details-bin": true,
	"grpc-encoding":           true,
	"grpc-accept-encoding":    true,
	"grpc-message-type":       true,
}

// isReserved reports whether key is kept out of tunneled metadata: gRPC's own
// headers and HTTP/2 pseudo-headers. This package's own "grpctunnel-"
// headers are not reserved: they only mean something on a tunnel-opening
// RPC, and such an RPC may itself travel through a tunnel.
func isReserved(key string) bool {
	return reservedHeaders[key] || strings.HasPrefix(key, ":")
}

// binaryEncoding is how "-bin" values travel when the binary-metadata
// extension is on. Decoding accepts padded input as well.
var binaryEncoding = base64.RawStdEncoding

// encodeMetadata converts md for the wire. Under the binary-metadata
// extension, "-bin" values are base64 so that any bytes survive the proto
// string field. Without it the plain protocol applies: values travel as they
// are, and a value that is not valid UTF-8 cannot travel at all.
func encodeMetadata(md metadata.MD, binary bool) (*tunnelpb.Metadata, error) {
	out := &tunnelpb.Metadata{Md: make(map[string]*tunnelpb.Metadata_Values, len(md))}
	for k, vals := range md {
		k = strings.ToLower(k)
		if isReserved(k) || len(vals) == 0 {
			continue
		}
		var enc []string
		if binary && strings.HasSuffix(k, "-bin") {
			enc = make([]string, len(vals))
			for i, v := range vals {
				enc[i] = binaryEncoding.EncodeToString([]byte(v))
			}
		} else {
			for _, v := range vals {
				if !utf8.ValidString(v) {
					return nil, errMetadataNotUTF8(k)
				}
			}
			// The values travel as they are: shared, not copied, and
			// capped so that an append below copies them.
			enc = vals[:len(vals):len(vals)]
		}
		if prev, ok := out.Md[k]; ok {
			prev.Val = append(prev.Val, enc...)
			continue
		}
		out.Md[k] = &tunnelpb.Metadata_Values{Val: enc}
	}
	return out, nil
}

// decodeMetadata converts wire metadata back, dropping reserved keys.
func decodeMetadata(pb *tunnelpb.Metadata, binary bool) (metadata.MD, error) {
	md := make(metadata.MD, len(pb.GetMd()))
	for k, vals := range pb.GetMd() {
		k = strings.ToLower(k)
		if isReserved(k) {
			continue
		}
		dec := vals.GetVal()
		if binary && strings.HasSuffix(k, "-bin") {
			dec = make([]string, len(vals.GetVal()))
			for i, v := range vals.GetVal() {
				b, err := decodeBinary(v)
				if err != nil {
					return nil, errMetadataBase64(k, err)
				}
				dec[i] = string(b)
			}
		}
		if prev, ok := md[k]; ok {
			md[k] = append(prev, dec...)
		} else {
			// Shared with the frame, which is not used again; capped so
			// that an append copies.
			md[k] = dec[:len(dec):len(dec)]
		}
	}
	return md, nil
}

func decodeBinary(v string) ([]byte, error) {
	if strings.HasSuffix(v, "=") {
		return base64.StdEncoding.DecodeString(v)
	}
	return binaryEncoding.DecodeString(v)
}

// decodeMetadata decodes received metadata and enforces the size limit,
// returning a status error to end the call with.
func (o *options) decodeMetadata(pb *tunnelpb.Metadata, binary bool) (metadata.MD, error) {
	if size := headerListSize(pb); size > o.maxHeaderListSize {
		return nil, errMetadataTooLarge(size, o.maxHeaderListSize)
	}
	md, err := decodeMetadata(pb, binary)
	if err != nil {
		return nil, errHeaderIn(err)
	}
	return md, nil
}

// headerListSize counts metadata as HTTP/2 does: each name and value, and 32
// bytes of overhead per entry.
func headerListSize(pb *tunnelpb.Metadata) int {
	size := 0
	for k, vals := range pb.GetMd() {
		for _, v := range vals.GetVal() {
			size += len(k) + len(v) + 32
		}
	}
	return size
}
