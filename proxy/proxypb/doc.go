// Package proxypb holds the generated Go code for grpctunnel.proxy.v1: the
// Label that package proxy appends to every response of a fanned-out call.
// Read it back with proxy.SplitLabel.
//
// Regenerate with `go generate ./tunnelpb` from the repository root.
package proxypb
