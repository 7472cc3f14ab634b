package tunnel

import (
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"

	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// Message compression is the "compression" extension (see PROTOCOL.md): a
// call made with grpc.UseCompressor names its compressor in the new_stream
// headers as grpc-encoding, and all its requests travel compressed; the
// handling end answers with the same compressor, named in its response
// headers. The protocol has no per-message flag, so compression is chosen
// per call and direction, as grpc-go chooses it anyway. With a peer that did
// not agree to the extension, calls travel uncompressed: the option is a
// request for efficiency, not for a different result.

// encodingHeader names a stream direction's compressor.
const encodingHeader = "grpc-encoding"

// sendCompressor is the compressor for a call's requests: the one the call
// asked for, if the peer agreed to compression. As in grpc-go, asking for
// one that is not registered is an error.
func (ci *callInfo) sendCompressor(agreed bool) (encoding.Compressor, error) {
	name := ci.compressor
	if name == "" || name == encoding.Identity {
		return nil, nil
	}
	c := encoding.GetCompressor(name)
	if c == nil {
		return nil, errNoCompressor(name)
	}
	if !agreed {
		return nil, nil
	}
	return c, nil
}

// recvCompressor is the compressor a header block names for the messages
// that follow it, or nil for none. Without the extension the header means
// nothing: a peer that did not agree to it never compresses.
func recvCompressor(md *tunnelpb.Metadata, agreed bool, code codes.Code) (encoding.Compressor, error) {
	if !agreed {
		return nil, nil
	}
	v := md.GetMd()[encodingHeader].GetVal()
	if len(v) == 0 || v[0] == encoding.Identity {
		return nil, nil
	}
	c := encoding.GetCompressor(v[0])
	if c == nil {
		return nil, errNoDecompressor(code, v[0])
	}
	return c, nil
}

// withEncoding adds the header naming c to a header block.
func withEncoding(md *tunnelpb.Metadata, c encoding.Compressor) *tunnelpb.Metadata {
	if c == nil {
		return md
	}
	if md == nil {
		md = &tunnelpb.Metadata{}
	}
	if md.Md == nil {
		md.Md = map[string]*tunnelpb.Metadata_Values{}
	}
	md.Md[encodingHeader] = &tunnelpb.Metadata_Values{Val: []string{c.Name()}}
	return md
}

// compressorName is c's name for stats events, "" for none.
func compressorName(c encoding.Compressor) string {
	if c == nil {
		return ""
	}
	return c.Name()
}

// compress returns data compressed with c, in buffers from the default
// pool. data is left to the caller.
func compress(c encoding.Compressor, data mem.BufferSlice) (mem.BufferSlice, error) {
	var out mem.BufferSlice
	w, err := c.Compress(mem.NewWriter(&out, mem.DefaultBufferPool()))
	if err == nil {
		for _, b := range data {
			if _, err = w.Write(b.ReadOnlyData()); err != nil {
				break
			}
		}
		if cerr := w.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		out.Free()
		return nil, errCompress(err)
	}
	return out, nil
}

// decompress returns data decompressed with c, refusing to produce more
// than maxSize bytes: the limit applies to what a message becomes, not only
// to what it took on the wire, so a small bomb costs at most one message's
// worth of memory. data is left to the caller.
func decompress(c encoding.Compressor, data mem.BufferSlice, maxSize int) (mem.BufferSlice, error) {
	rd := data.Reader()
	defer rd.Close()
	r, err := c.Decompress(rd)
	if err != nil {
		return nil, errDecompress(err)
	}
	out, err := mem.ReadAll(io.LimitReader(r, int64(maxSize)+1), mem.DefaultBufferPool())
	if err != nil {
		out.Free()
		return nil, errDecompress(err)
	}
	if out.Len() > maxSize {
		out.Free()
		return nil, errDecompressedTooLarge(maxSize)
	}
	return out, nil
}
