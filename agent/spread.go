package agent

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/grpc/metadata"

	"github.com/grpctunnel/grpctunnel/internal/errtext"
	"github.com/grpctunnel/grpctunnel/internal/replica"
	"github.com/grpctunnel/grpctunnel/tunnel"
)

// Spreading tunnels over gateway replicas.
//
// A gateway cluster runs several replicas, and each names itself in the
// response header of the tunnels it accepts (replica.Header). An agent
// whose tunnels all sit on one replica is unreachable from the moment that
// replica dies until its tunnels have reopened elsewhere, so the agent
// keeps its tunnels on distinct replicas where it can: a tunnel that opens
// on a replica holding more of the agent's tunnels than another replica
// that may exist is given back before it serves a call (see
// tunnel.ReconnectOptions.Admit) and opened again, and the gateway
// connection's round-robin sends the next attempt to the next replica.
//
// Which replicas may exist: the gateway addresses the agent balances over
// (Options.GatewayAddresses), and every replica that has taken one of its
// tunnels. Nothing guarantees another one is up, so each tunnel is given
// back at most spreadBudget times in a row; then the agent keeps it where
// it landed, forgets the replicas it saw before that hold none of its
// tunnels (they did not take it: behind one load-balanced address they
// may never be reached again), and tries again later, after
// firstSpreadRecheck and then twice as long each time, by giving back one
// tunnel of a crowded replica. A gateway that names no replica is not a cluster: its tunnels
// are kept wherever they land.

// minSpreadBudget is the least number of times in a row a tunnel is given
// back for landing on a crowded replica; an agent with more tunnels gets
// one per tunnel, since with round-robin each attempt may meet another of
// its replicas.
const minSpreadBudget = 3

// firstSpreadRecheck is the first wait before a tunnel kept beside another
// is moved. A replica that was down when the tunnel opened is usually one
// restarting, as in a rolling restart; gRPC tries its address again a
// second after it went (its first reconnect backoff), so two seconds lets
// the move find it back, and an agent whose tunnels a rolling restart
// crowded onto one replica spreads them again before the next replica
// goes.
const firstSpreadRecheck = 2 * time.Second

// maxRecheckFactor caps the wait between later tries, as a multiple of
// the first: an agent that cannot spread its tunnels, behind one healthy
// replica, gives a tunnel back about every half minute at most.
const maxRecheckFactor = 16

// openTunnel is one of the agent's tunnels, from the moment it is
// admitted until it ends.
type openTunnel struct {
	replica  string // the replica that took it; "" if the gateway named none
	reported bool   // reported open: Health and the metrics count it
	giveBack func(reason error)
}

// replicaOf is the replica named in the header of a tunnel's opening RPC,
// "" if none.
func replicaOf(hdr metadata.MD) string {
	if v := hdr.Get(replica.Header); len(v) > 0 {
		return v[0]
	}
	return ""
}

// admit is the agent's tunnel.ReconnectOptions.Admit: it keeps the tunnel
// unless it landed on a crowded replica and may go elsewhere; see above.
func (a *Agent) admit(c tunnel.StateChange) error {
	id := replicaOf(c.Header)
	a.mu.Lock()
	defer a.mu.Unlock()
	if id != "" {
		a.seen[id] = true
		if holder, crowded := a.crowdedLocked(c.Tunnel, id); crowded {
			if a.refusals[c.Tunnel] < a.spreadBudget {
				a.refusals[c.Tunnel]++
				return fmt.Errorf("gateway replica %s holds tunnel %d of this agent already", errtext.Quote(id), holder)
			}
			a.keepCrowdedLocked(c.Tunnel, id)
		} else if a.refusals[c.Tunnel] > 0 {
			// Spreading worked: the next crowding starts with a short wait.
			a.recheckWait = 0
		}
	}
	delete(a.refusals, c.Tunnel)
	// Recorded now, not when reported open, so that two tunnels admitted at
	// once each see the other.
	a.open[c.Tunnel] = &openTunnel{replica: id}
	return nil
}

// crowdedLocked reports whether replica id holds more of the agent's open
// tunnels, other than tunnel slot, than some other replica that may exist,
// and one of those tunnels. a.mu must be held.
func (a *Agent) crowdedLocked(slot int, id string) (holder int, crowded bool) {
	held := map[string]int{}
	holder = -1
	for s, t := range a.open {
		if s == slot || t.replica == "" {
			continue
		}
		held[t.replica]++
		if t.replica == id && (holder < 0 || s < holder) {
			holder = s
		}
	}
	if held[id] == 0 {
		return -1, false
	}
	if max(a.gatewayAddresses, len(a.seen)) > len(held) {
		return holder, true // a replica holds none of them
	}
	least := held[id]
	for _, n := range held {
		least = min(least, n)
	}
	return holder, held[id] > least
}

// keepCrowdedLocked keeps tunnel slot on the crowded replica id after it
// was given back as often as it may be, and schedules a later try. a.mu
// must be held.
func (a *Agent) keepCrowdedLocked(slot int, id string) {
	// The replicas seen before that hold none of the agent's tunnels did
	// not take this one: unless more addresses say so, stop expecting them.
	for r := range a.seen {
		if r != id && !a.holdsLocked(r) {
			delete(a.seen, r)
		}
	}
	a.recheckWait = cmp.Or(a.recheckWait, a.firstRecheck)
	wait := a.recheckWait
	if a.recheck == nil && a.running {
		a.recheck = time.AfterFunc(wait, a.spreadAgain)
	}
	a.log.Info("tunnel kept on a gateway replica that holds another: no other replica took it; trying again later",
		"tunnel", slot, "key", a.key, "replica", id, "retry_in", wait.Round(time.Millisecond).String())
}

// holdsLocked reports whether replica r holds one of the agent's open
// tunnels. a.mu must be held.
func (a *Agent) holdsLocked(r string) bool {
	for _, t := range a.open {
		if t.replica == r {
			return true
		}
	}
	return false
}

// spreadAgain is the later try: if a replica is still crowded, one of its
// tunnels is given back (drained, so that its calls finish), and it goes
// through admit again, with its full budget.
func (a *Agent) spreadAgain() {
	a.mu.Lock()
	a.recheck = nil
	if !a.running {
		a.mu.Unlock()
		return
	}
	slots := make([]int, 0, len(a.open))
	for s := range a.open {
		slots = append(slots, s)
	}
	slices.Sort(slots)
	for i := len(slots) - 1; i >= 0; i-- {
		s := slots[i]
		t := a.open[s]
		if t.replica == "" || t.giveBack == nil {
			continue
		}
		if holder, crowded := a.crowdedLocked(s, t.replica); crowded {
			giveBack := t.giveBack
			a.recheckWait = min(2*a.recheckWait, maxRecheckFactor*a.firstRecheck)
			a.mu.Unlock()
			giveBack(fmt.Errorf("gateway replica %s holds tunnel %d of this agent too: trying another replica", errtext.Quote(t.replica), holder))
			return
		}
	}
	a.recheckWait = 0 // spread, or nothing to gain
	a.mu.Unlock()
}

// stopSpreading ends the later tries when Run returns.
func (a *Agent) stopSpreading() {
	a.mu.Lock()
	a.running = false
	if a.recheck != nil {
		a.recheck.Stop()
		a.recheck = nil
	}
	a.mu.Unlock()
}

// replicasLocked is the distinct replicas the agent's reported open
// tunnels are on, sorted. a.mu must be held.
func (a *Agent) replicasLocked() []string {
	var out []string
	for _, t := range a.open {
		if t.reported && t.replica != "" && !slices.Contains(out, t.replica) {
			out = append(out, t.replica)
		}
	}
	slices.Sort(out)
	return out
}

// givenBack reports whether a tunnel's end was the agent's own doing.
func givenBack(err error) bool { return errors.Is(err, tunnel.ErrGivenBack) }
