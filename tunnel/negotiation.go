package tunnel

import (
	"fmt"
	"strconv"
	"strings"

	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// Headers exchanged on the tunnel-opening RPC.
const (
	// negotiateHeader, sent by both network client and network server,
	// switches the tunnel to protocol revision one.
	negotiateHeader = "grpctunnel-negotiate"
	negotiateOn     = "on"

	// extensionsHeader lists the extensions an end supports. The network
	// server answers with the ones it accepts from the client's list; only
	// those are used. A plain peer sends and answers nothing, so nothing is
	// used. See PROTOCOL.md.
	extensionsHeader = "grpctunnel-extensions"

	// extBinaryMetadata sends "-bin" metadata values base64-encoded, so any
	// bytes survive the protocol's string fields.
	extBinaryMetadata = "binary-metadata"

	// extMaxChunk, as "max-chunk=N", announces that this end accepts
	// message chunks of up to N bytes instead of 16 KiB. Each end sends
	// chunks no larger than the other announced, so a large message costs
	// fewer frames.
	extMaxChunk = "max-chunk"

	// extTunnelClose lets the network server ask the network client to end
	// the tunnel, with a frame on stream -1: close_stream from a tunnel
	// server, cancel from a tunnel client. gRPC gives a server no way to
	// end a stream while a read is blocked, so without it the network
	// server needs a reader goroutine of its own just to be able to end a
	// tunnel; with it, the handler's goroutine can do the reading (see
	// readsInline for when it does).
	extTunnelClose = "tunnel-close"

	// extDrain lets a draining tunnel server tell the tunnel client, with
	// response_headers on stream -1, to start no more calls on the tunnel
	// and to end it once its calls are done. The server keeps accepting
	// the calls that crossed the notice, so none is refused: a client with
	// other tunnels moves to them without a failed call.
	extDrain = "drain"

	// extKeepalive lets either end ping the other with a window_update on
	// stream -1, to find a tunnel whose peer went silent (see keepalive).
	extKeepalive = "keepalive"

	// extCompression lets a call's messages travel compressed with the
	// compressor its grpc-encoding header names (see compression.go).
	extCompression = "compression"
)

// settingsStreamID marks the settings frame, which concerns the whole tunnel.
const settingsStreamID = -1

// supportedRevisions are the revisions this package speaks, lowest first.
var supportedRevisions = []tunnelpb.ProtocolRevision{
	tunnelpb.ProtocolRevision_REVISION_ZERO,
	tunnelpb.ProtocolRevision_REVISION_ONE,
}

// agreement is what the two ends of a tunnel settled on when it opened.
type agreement struct {
	// negotiated is true when both ends sent the negotiate header, so the
	// tunnel server sends settings and revision one may be used.
	negotiated bool
	// binaryMetadata is the binary-metadata extension.
	binaryMetadata bool
	// maxChunk is the largest chunk this end may send: 16 KiB unless the
	// peer announced more with the max-chunk extension.
	maxChunk int
	// tunnelClose is the tunnel-close extension.
	tunnelClose bool
	// keepalive is the keepalive extension.
	keepalive bool
	// drain is the drain extension.
	drain bool
	// compression is the compression extension.
	compression bool
}

// extensions is the value of the extensions header this end sends.
func (o *options) extensions() string {
	return fmt.Sprintf("%s, %s=%d, %s, %s, %s, %s", extBinaryMetadata, extMaxChunk, o.maxChunk, extTunnelClose, extKeepalive, extCompression, extDrain)
}

// openingHeaders is the metadata the network client adds when it opens a
// tunnel.
func (o *options) openingHeaders() metadata.MD {
	md := metadata.MD{}
	if !o.disableFlowControl {
		md.Set(negotiateHeader, negotiateOn)
	}
	if !o.plain {
		md.Set(extensionsHeader, o.extensions())
	}
	return md
}

// accept is the network server's side: given the opening request's metadata
// it returns the response headers to send at once, and what was agreed.
func (o *options) accept(req metadata.MD) (metadata.MD, agreement) {
	o.acceptOnce.Do(func() {
		for i := range o.acceptResp {
			resp := metadata.MD{}
			if !o.disableFlowControl {
				resp.Set(negotiateHeader, negotiateOn)
			}
			if !o.plain && i == 1 {
				// Answer with what this end supports; only what both
				// list is used.
				resp.Set(extensionsHeader, o.extensions())
			}
			o.acceptResp[i] = resp
		}
	})
	a := o.agree(req)
	a.negotiated = a.negotiated && !o.disableFlowControl
	// Shared by every tunnel, as gRPC only reads the headers it sends.
	resp := o.acceptResp[0]
	if len(req.Get(extensionsHeader)) > 0 {
		resp = o.acceptResp[1]
	}
	return resp, a
}

// agreed is the network client's side: what the server's response headers
// say was agreed.
func (o *options) agreed(resp metadata.MD) agreement {
	a := o.agree(resp)
	a.negotiated = a.negotiated && !o.disableFlowControl
	return a
}

// agree computes the agreement from the other end's headers.
func (o *options) agree(peer metadata.MD) agreement {
	a := agreement{
		negotiated: hasValue(peer, negotiateHeader, negotiateOn),
		maxChunk:   flowcontrol.MaxChunk,
	}
	if o.plain {
		return a
	}
	a.binaryMetadata = hasValue(peer, extensionsHeader, extBinaryMetadata)
	a.tunnelClose = hasValue(peer, extensionsHeader, extTunnelClose)
	a.keepalive = hasValue(peer, extensionsHeader, extKeepalive)
	a.compression = hasValue(peer, extensionsHeader, extCompression)
	a.drain = hasValue(peer, extensionsHeader, extDrain)
	if v, ok := extensionValue(peer, extMaxChunk); ok {
		if n, err := strconv.ParseUint(v, 10, 32); err == nil && n > flowcontrol.MaxChunk {
			a.maxChunk = int(min(n, uint64(o.maxChunk)))
		}
	}
	return a
}

// extensionValue returns the value of a "name=value" item of the extensions
// header.
func extensionValue(md metadata.MD, name string) (string, bool) {
	for _, v := range md.Get(extensionsHeader) {
		for _, item := range strings.Split(v, ",") {
			k, val, ok := strings.Cut(strings.TrimSpace(item), "=")
			if ok && k == name {
				return val, true
			}
		}
	}
	return "", false
}

// hasValue reports whether any value of key, read as a comma-separated
// list, is want.
func hasValue(md metadata.MD, key, want string) bool {
	for _, v := range md.Get(key) {
		for _, item := range strings.Split(v, ",") {
			if strings.TrimSpace(item) == want {
				return true
			}
		}
	}
	return false
}

// settingsFrame is the tunnel server's first frame under revision one.
func (o *options) settingsFrame() *tunnelpb.ServerToClient {
	return serverFramer(settingsStreamID).settings(supportedRevisions, o.initialWindow)
}

// chooseRevision picks the highest revision both ends support.
func chooseRevision(peer []tunnelpb.ProtocolRevision) (tunnelpb.ProtocolRevision, error) {
	best := tunnelpb.ProtocolRevision(-1)
	for _, r := range peer {
		for _, mine := range supportedRevisions {
			if r == mine && r > best {
				best = r
			}
		}
	}
	if best < 0 {
		return 0, errNoCommonRevision(peer, supportedRevisions)
	}
	return best, nil
}
