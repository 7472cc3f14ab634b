// Package cluster is the directory of which gateway replica holds which agent
// tunnel, kept in etcd, so that several gateway replicas can serve one set of
// agents: a caller may reach any replica, and a replica that does not hold the
// agent's tunnel looks up, here, a replica that does, and forwards the call to
// it.
//
// This package is only the directory. It does not forward anything itself.
//
// # Model
//
// Each replica that calls [Join] holds ONE etcd lease (TTL [Options.TTL],
// 10 s by default), kept alive with the etcd client's KeepAlive. Every key the
// replica writes is attached to that lease, so when the replica dies without
// saying so its entries vanish after the TTL, and when it calls
// [Directory.Close] the lease is revoked and they vanish at once.
//
// The keys, under a prefix that defaults to "/" + the cluster name
// ("/grpctunnel" unless [Options.Cluster] names another):
//
//	<prefix>/replicas/<replicaID>                      = {"addr":"10.0.0.7:7443"}  (lease of replicaID)
//	<prefix>/tunnels/<agentKey>/<replicaID>/<tunnelID> = ""                       (lease of replicaID)
//
//	/grpctunnel/prod
//	├── replicas
//	│   ├── gw-a        {"addr":"10.0.0.7:7443"}
//	│   └── gw-b        {"addr":"10.0.0.8:7443"}
//	└── tunnels
//	    ├── tenant%2Fagent-1
//	    │   ├── gw-a
//	    │   │   └── t1
//	    │   └── gw-b
//	    │       └── t9
//	    └── agent-2
//	        └── gw-b
//	            └── t4
//
// Agent keys may contain '/' and any other printable character, so each of
// the three path segments (agent key, replica id and tunnel id) is escaped with
// [url.PathEscape], which turns '/' into "%2F"; the segments are therefore
// never ambiguous and a key never spills into another agent's subtree. The
// accessors take and return the unescaped values.
//
// # Cost
//
// Opening a tunnel costs exactly one etcd write (a Put with the lease) and
// closing it exactly one (a Delete); nothing is written per call. The writes
// are made by a background goroutine so that opening a tunnel never waits on
// etcd; when several are pending at once they are sent together in one etcd
// transaction, still one write.
//
// Every replica keeps the whole directory in memory, loaded with a Get and
// kept current with a Watch that starts at the Get's revision + 1, so no
// change falls in between. Lookups ([Directory.Holders],
// [Directory.Replicas]) therefore never wait on etcd. Replica ids and
// addresses are interned: an entry refers to its replica, it does not copy it.
//
// # Failures
//
// If the watch is compacted or cancelled, the directory is loaded again with a
// Get and watched again from there. While etcd is unreachable the replica
// keeps serving the last directory it had, and reports the outage through
// [Directory.Healthy] and a log line on each change of state. When etcd is
// back, the replica checks its lease: if it is still alive it goes on with it
// and sends the writes it could not send; if it expired meanwhile, the replica
// takes a new lease, registers itself and ALL its current local tunnels again,
// and loads the directory again.
package cluster
