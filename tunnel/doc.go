// Package tunnel carries gRPC inside gRPC: one bidirectional stream, a
// tunnel, multiplexes many RPCs, and each end of it can be used as a
// grpc.ClientConnInterface or served like a *grpc.Server.
//
// # The model
//
// Two pairs of roles meet in every tunnel. The network client dials and
// opens the tunnel with an RPC; the network server accepts it. The tunnel
// client issues RPCs inside the tunnel; the tunnel server handles them. The
// two pairs line up in a forward tunnel and cross in a reverse one:
//
//	forward (NewChannel):
//
//	  network client                              network server
//	  TunnelChannel ===== OpenTunnel stream =====> TunnelServiceHandler
//	  (tunnel client: issues RPCs)                 (tunnel server: serves
//	                                                the registered services)
//
//	reverse (NewReverseTunnelServer):
//
//	  network client                              network server
//	  ReverseTunnelServer == OpenReverseTunnel ==> TunnelServiceHandler
//	  (tunnel server: serves                       (tunnel client: AsChannel,
//	   the registered services)                     KeyAsChannel issue RPCs)
//
// A forward tunnel pins a conversation of many calls to the one backend that
// accepted it, whatever load balancing sits in front. A reverse tunnel lets
// a server call services hosted by a client it cannot dial, one behind NAT or
// a firewall: server push with real RPC semantics.
//
// # Streams and flow control
//
// Inside a tunnel every call is a stream with an ID, started by a new_stream
// frame and ended by a close_stream (or a cancel) frame; messages travel in
// chunks of at most 16 KiB. Under protocol revision one, which the ends
// negotiate when the tunnel opens, each direction of each stream has its own
// window: a sender stops when the window is used up and the receiver
// replenishes it as the application consumes messages. A slow or stalled
// consumer therefore holds up only its own stream, never the tunnel.
// Revision zero has no windows; it exists for old peers (see
// WithDisableFlowControl).
//
// # Goroutines
//
// Each tunnel has one reader goroutine. Each call handled by a tunnel server
// runs in a goroutine of its own, as on a *grpc.Server; a call issued through
// a tunnel uses only the caller's goroutine. Control frames the reader must
// send (window updates, refusals) go through a short-lived flusher goroutine
// so that the reader never blocks on the network.
//
// # Interceptors
//
// Interceptors are tunnel options, as they are server and dial options in
// gRPC: WithUnaryInterceptor, WithStreamInterceptor and their chain forms
// wrap the calls a tunnel end handles; WithClientUnaryInterceptor,
// WithClientStreamInterceptor and their chain forms the calls made on a
// channel. Tunnel servers are also grpc.ServiceRegistrars, so server
// interceptors can wrap services as they are registered, and channels are
// grpc.ClientConnInterfaces, so client interceptors can wrap the channel;
// grpchan provides both:
//
//	reg := grpchan.WithInterceptor(handler, unaryInterceptor, streamInterceptor)
//	pb.RegisterFooServer(reg, impl)
//
//	ch = grpchan.InterceptClientConn(ch, unaryClientInterceptor, streamClientInterceptor)
//
// Interceptors on the *grpc.Server that hosts a TunnelServiceHandler see the
// tunnel-opening RPC; authenticate tunnels there, and read the result in
// tunneled handlers with TunnelMetadataFromIncomingContext or, for reverse
// tunnels, in an AffinityKey function through TunnelChannel.Context.
//
// # Telemetry
//
// Stats handlers are tunnel options too, reporting what grpc-go reports:
// WithStatsHandler the calls a tunnel end handles, WithClientStatsHandler
// the calls made on a channel. Each tunnel is reported as a connection, and
// each call within it as an RPC, so OpenTelemetry works by giving otelgrpc's
// handlers:
//
//	tunnel.WithStatsHandler(otelgrpc.NewServerHandler())       // handling end
//	tunnel.WithClientStatsHandler(otelgrpc.NewClientHandler()) // calling end
//
// The trace context travels in the call's metadata, put there by otelgrpc's
// propagators, so a tunneled call's server span is a child of its client
// span. Stats handlers on the *grpc.Server that hosts a TunnelServiceHandler
// see only the tunnel-opening RPC, one long call.
//
// # Compression
//
// A call made with grpc.UseCompressor travels compressed when both ends are
// of this package, which agree on it through a protocol extension (see
// PROTOCOL.md); with a plain peer the call goes uncompressed and behaves the
// same. The tunnel server answers with the compressor of the request, and
// the receive size limit applies to a message once decompressed.
// grpc.SetSendCompressor and grpc.ClientSupportedCompressors return an error
// in tunneled handlers: gRPC ties them to its own transport's streams.
package tunnel
