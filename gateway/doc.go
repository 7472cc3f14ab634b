// Package gateway puts services that sit behind NAT on one public port.
//
// Agents (see package agent) dial the gateway and open reverse tunnels,
// each announcing a key. Ordinary gRPC clients call the same port and name
// the agent they want in a request header, tunnel-key by default; the
// gateway strips that header and forwards the call, schema-free, through
// one of the agent's tunnels, and the agent forwards it to its local
// service. Neither the client nor the service changes: grpcurl, reflection
// and generated stubs work as they do against the service itself.
//
//	client --(tunnel-key: k)--> gateway ==(reverse tunnel, key k)== agent --> service
//	                              ^ the agent dialled out, so nothing dials in behind the NAT
//
// Calls that name no agent are answered by the gateway itself: gRPC health,
// server reflection and the AdminService of package adminpb, which lists the
// connected agents. Naming several agents (repeated headers or a
// comma-separated list) fans the call out to each of them, with every
// response labelled by key as package proxy describes.
//
// A Gateway is not a server: it gives the options and the registration a
// *grpc.Server needs (see New), so the server keeps its own transport
// credentials, interceptors and listeners. Metrics go to a Prometheus
// registerer when one is given.
package gateway
