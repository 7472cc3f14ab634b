// Package tunnelpb holds the generated Go code for the grpctunnel.v1 protocol:
// the frame messages and the TunnelService client and server stubs.
//
// Regenerate with `go generate ./tunnelpb` from the repository root.
package tunnelpb

//go:generate sh -c "cd .. && go run github.com/bufbuild/buf/cmd/buf@v1.70.0 generate"
