package main

import (
	"context"
	"os"
	"runtime/pprof"
)

// With -cpuprofile the whole run is profiled. Every call in the gateway
// rows crosses the caller, the gateway, the agent and the service, all in
// this process, so their goroutines are labelled with the part they play
// (see inPart) and a profile can be read one part at a time:
//
//	go tool pprof -tagfocus part=gateway tunnelbench cpu.prof
//
// The parts are caller, service, gateway, agent, l4 (both sides of the L4
// forwarder) and relay (the delaying relay).

// startCPUProfile starts profiling the CPU into file; stop ends it and
// closes the file.
func startCPUProfile(file string) (stop func(), err error) {
	f, err := os.Create(file)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}

// inPart runs f with the profiler label part=name, which every goroutine
// that f starts inherits, and so every goroutine those start in turn: a
// server started in f is labelled with all its connections and handlers.
func inPart(name string, f func()) {
	pprof.Do(context.Background(), pprof.Labels("part", name), func(context.Context) { f() })
}
