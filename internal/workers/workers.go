// Package workers runs tasks on goroutines that are kept for the next task,
// as grpc-go's NumStreamWorkers does for a server's calls.
//
// A new goroutine starts with a small stack, and a call's work through a
// proxy and a tunnel goes deep enough to grow it every time: on a gateway
// that copying was a quarter of the CPU a call cost. A worker keeps the
// stack its earlier tasks grew, so after the first few calls none grows.
// Workers left idle exit after a short while, so that a burst leaves
// nothing behind.
package workers

import (
	"sync"
	"sync/atomic"
	"time"
)

// Pool runs tasks of type T with one function on reusable goroutines.
type Pool[T any] struct {
	run      func(T)
	maxIdle  int32
	idleTime time.Duration

	work chan T
	idle atomic.Int32
	live sync.WaitGroup
	stop chan struct{} // closed by Close
	once sync.Once
}

// New returns a pool that runs tasks with run, keeping at most maxIdle
// workers waiting, each for at most idleTime.
func New[T any](run func(T), maxIdle int, idleTime time.Duration) *Pool[T] {
	return &Pool[T]{
		run:      run,
		maxIdle:  int32(maxIdle),
		idleTime: idleTime,
		work:     make(chan T),
		stop:     make(chan struct{}),
	}
}

// Go runs task on an idle worker, or on a new one when none is idle. It
// never blocks.
func (p *Pool[T]) Go(task T) {
	select {
	case p.work <- task:
	default:
		p.live.Add(1)
		go p.worker(task)
	}
}

// Close makes idle workers exit at once, and busy ones once their task is
// done, and waits for them. Go must not be called after Close.
func (p *Pool[T]) Close() {
	p.once.Do(func() { close(p.stop) })
	p.live.Wait()
}

func (p *Pool[T]) worker(task T) {
	defer p.live.Done()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	var zero T
	for {
		p.run(task)
		task = zero // not kept alive while idle
		if p.idle.Add(1) > p.maxIdle {
			p.idle.Add(-1)
			return
		}
		if timer == nil {
			timer = time.NewTimer(p.idleTime)
		} else {
			timer.Reset(p.idleTime)
		}
		select {
		case task = <-p.work:
			p.idle.Add(-1)
		case <-timer.C:
			p.idle.Add(-1)
			return
		case <-p.stop:
			p.idle.Add(-1)
			return
		}
	}
}
