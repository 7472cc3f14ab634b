// Package proxy forwards gRPC calls without knowing their schema: messages
// pass through as bytes, never decoded, so one proxy serves any service.
//
// A [Director] decides, per call, where the call goes: any
// grpc.ClientConnInterface (a *grpc.ClientConn, a tunnel.TunnelChannel, or a
// reverse channel from tunnel.TunnelServiceHandler.KeyAsChannel) and the
// metadata to send. [Handler] returns the grpc.StreamHandler that does the
// forwarding; install it as the unknown-service handler of a *grpc.Server
// with [ServerOptions], or of a tunnel server.
//
// Forwarding is one to one and transparent: every message, the response
// headers (as soon as the backend sends them, before any message and on
// errors too), the trailers, the status with its details, half-close and
// cancellation pass unchanged. The call is routed before the first client
// message arrives, so a client that waits for headers first does not
// deadlock, and the proxied call ends when the backend's does, whether or
// not the client has half-closed.
package proxy
