// Package replica holds what the gateway's replicas and the agents agree on
// about the replicas of one gateway cluster, so that neither package has to
// import the other.
package replica

// Header is the response header in which a gateway replica names itself
// when it accepts a tunnel: an agent given several gateway addresses reads
// it to tell which replica each of its tunnels landed on, and keeps them on
// distinct replicas where it can, so that losing one replica never leaves
// the agent unreachable. A gateway that is not part of a cluster sends none.
const Header = "grpctunnel-replica"
