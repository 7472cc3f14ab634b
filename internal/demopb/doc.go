// Package demopb holds the generated Go code for grpctunnel.demo.v1, the
// small DeviceService that the runnable examples serve through tunnels. It
// is internal because it exists only to make the examples concrete; it is no
// part of the library's API.
//
// The code is generated together with tunnelpb: run `go generate ./tunnelpb`
// from the repository root.
package demopb
