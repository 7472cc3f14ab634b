package tunnel

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// callInfo is what a tunneled call takes from its grpc.CallOptions. Options
// that only make sense for a real connection (static method hints, for
// instance) are accepted and ignored, as they are when gRPC does not apply
// them.
type callInfo struct {
	headers      []*metadata.MD
	trailers     []*metadata.MD
	peers        []*peer.Peer
	channels     []*TunnelChannel
	onFinish     []func(error)
	creds        credentials.PerRPCCredentials
	codec        encoding.CodecV2
	compressor   string              // grpc.UseCompressor's name
	comp         encoding.Compressor // what the requests use; see sendCompressor
	maxRecv      int
	maxSend      int
	waitForReady bool
}

func newCallInfo(o *options, opts []grpc.CallOption) (*callInfo, error) {
	ci := &callInfo{maxRecv: o.maxRecvMsgSize, maxSend: o.maxSendMsgSize}
	for _, opt := range opts {
		switch opt := opt.(type) {
		case grpc.HeaderCallOption:
			ci.headers = append(ci.headers, opt.HeaderAddr)
		case grpc.TrailerCallOption:
			ci.trailers = append(ci.trailers, opt.TrailerAddr)
		case grpc.PeerCallOption:
			ci.peers = append(ci.peers, opt.PeerAddr)
		case *tunnelChannelCallOption:
			ci.channels = append(ci.channels, opt.ch)
		case grpc.OnFinishCallOption:
			ci.onFinish = append(ci.onFinish, opt.OnFinish)
		case grpc.PerRPCCredsCallOption:
			ci.creds = opt.Creds
		case grpc.MaxRecvMsgSizeCallOption:
			ci.maxRecv = opt.MaxRecvMsgSize
		case grpc.MaxSendMsgSizeCallOption:
			ci.maxSend = opt.MaxSendMsgSize
		case grpc.ForceCodecCallOption:
			ci.codec = codecV1{opt.Codec}
		case grpc.ForceCodecV2CallOption:
			ci.codec = opt.CodecV2
		case grpc.ContentSubtypeCallOption:
			if ci.codec != nil {
				continue // a forced codec wins, as in gRPC
			}
			c := encoding.GetCodecV2(opt.ContentSubtype)
			if c == nil {
				return nil, errNoCodec(opt.ContentSubtype)
			}
			ci.codec = c
		case grpc.CompressorCallOption:
			ci.compressor = opt.CompressorType
		case grpc.FailFastCallOption:
			ci.waitForReady = !opt.FailFast
		}
	}
	if ci.codec == nil {
		ci.codec = defaultCodec()
	}
	return ci, nil
}

// requestCredentials asks the call's per-RPC credentials for metadata, with
// the same transport-security check gRPC makes.
func (ci *callInfo) requestCredentials(ctx context.Context, method string, authInfo credentials.AuthInfo) (map[string]string, error) {
	if ci.creds == nil {
		return nil, nil
	}
	if ci.creds.RequireTransportSecurity() {
		if authInfo == nil || credentials.CheckSecurityLevel(authInfo, credentials.PrivacyAndIntegrity) != nil {
			return nil, errInsecureCredentials
		}
	}
	md, err := ci.creds.GetRequestMetadata(ctx, "tunnel:"+method)
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, errCredentials(err)
	}
	return md, nil
}

// marshal encodes a request for the wire (see encodeMessage).
func (ci *callInfo) marshal(m any) (mem.BufferSlice, int, error) {
	return encodeMessage(ci.codec, ci.comp, ci.maxSend, m)
}

// finish delivers what the call options asked to see once the call is over.
func (ci *callInfo) finish(header, trailer metadata.MD, p *peer.Peer, ch TunnelChannel, err error) {
	for _, h := range ci.headers {
		*h = header
	}
	for _, t := range ci.trailers {
		*t = trailer
	}
	if p != nil {
		for _, dst := range ci.peers {
			*dst = *p
		}
	}
	for _, dst := range ci.channels {
		*dst = ch
	}
	for _, f := range ci.onFinish {
		f(err)
	}
}
