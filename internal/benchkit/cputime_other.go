//go:build !unix

package benchkit

import "time"

// ProcessCPU returns the CPU time this process has used so far; it cannot
// be read on this platform.
func ProcessCPU() (time.Duration, bool) { return 0, false }
