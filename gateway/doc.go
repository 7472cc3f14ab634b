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
//
// # Several replicas
//
// When one process is not enough, or must not be the one thing whose
// restart drops every agent, gateways run as replicas of one cluster
// behind a load balancer (Options.Cluster; package gateway/cluster keeps
// the cluster's directory in etcd). Agents and callers may reach any
// replica:
//
//	                       etcd: /<cluster>/replicas/<replica>          = peer address   (replica's lease)
//	                             /<cluster>/tunnels/<key>/<replica>/<t> = ""             (replica's lease)
//	                          put on open, delete on close  |  get + watch: each replica's copy in memory
//	                    +-----------------------------------+----------------------------------+
//	                    |                                   |                                  |
//	client --(key k)--> replica B --(peer port: key k, cluster token)--> replica A ==(tunnel k)== agent k --> service
//	                    |  holds no tunnel of k:                  holds one: routes locally (if its
//	                    |  looks A up in its copy                 tunnel just went: one hop more, the last)
//
// Each replica records the tunnels it holds in the directory as they open
// and close, one write each, never one per call; routing reads only the
// replica's own copy, so no call waits on etcd, and a replica that loses
// etcd keeps routing with the copy it has. A replica that holds no tunnel
// of the agent a call names forwards the call to one that does, on that
// replica's peer port (PeerServerOptions), which admits only calls
// carrying the cluster's token (Options.ClusterToken) and, with TLS, only
// replicas' certificates. The receiving replica routes to its own tunnels;
// only if it holds none any more (it drained them, or the agent moved one,
// before the sender's copy showed it) does it forward the call once more,
// and that replica forwards no further, however stale the copies are: a
// call crosses at most two hops between replicas, the second only in that
// window. Authorization (AuthorizeCall) runs
// once, on the replica the caller reached. A fan-out sends each agent's
// share to the replica holding it; ListAgents asks every replica and
// names the one holding each tunnel. Each tunnel's response header names
// its replica (internal to the two packages), so that an agent can keep
// its tunnels on different replicas and survive the loss of one.
//
// A replica that dies takes the calls running through it down with it
// (they fail with Unavailable: only their callers may repeat them); its
// entries leave the directory when its lease expires, and until then the
// others try the next replica that holds the agent. A replica that drains
// first withdraws (Withdraw): its tunnels leave the directory and it sends
// new calls to the other replicas, while its own tunnels finish theirs;
// then it drains (Shutdown) and, last, leaves the directory.
package gateway
