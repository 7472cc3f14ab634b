package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
)

// reloadable holds material that SIGHUP may replace while it is in use: a
// certificate, a CA pool, a token set. Readers load the current value at
// the moment they need it (a TLS handshake, a tunnel's opening, a call), so
// that what was admitted under the old value keeps going and only what
// comes next sees the new one. It is an atomic pointer rather than a lock
// because every handshake and call reads it and only a reload writes.
type reloadable[T any] struct{ p atomic.Pointer[T] }

// newReloadable returns a holder of v, which must not be nil: readers
// never check.
func newReloadable[T any](v *T) *reloadable[T] {
	r := &reloadable[T]{}
	r.p.Store(v)
	return r
}

// load returns the current value.
func (r *reloadable[T]) load() *T { return r.p.Load() }

// reloadItem is one piece of material that a reload replaces.
type reloadItem struct {
	// name says what the item is in the log lines: "tls", "tokens" ...
	name string
	// prepare reads and validates the item's files without installing
	// anything, so that a reload can refuse as a whole; it returns what
	// installs the new value, and log attributes that describe it.
	prepare func() (commit func(), attrs []any, err error)
}

// reloader rereads a command's certificates and token files on SIGHUP.
// Every item is loaded and validated before any is installed: a rotation
// often changes files that only make sense together (a certificate and its
// key, a CA bundle and the certificate it must trust), and half of one
// installed would lock agents or callers out.
type reloader struct {
	log   *slog.Logger
	mu    sync.Mutex // one reload at a time, so that commits never interleave; guards items
	items []reloadItem
}

// addReloadable registers dst with r: a reload replaces its value with
// what load returns, described in the log by describe.
// It may be called while watch is on, as the command starts.
func addReloadable[T any](r *reloader, name string, dst *reloadable[T], load func() (*T, error), describe func(*T) []any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.items = append(r.items, reloadItem{name: name, prepare: func() (func(), []any, error) {
		v, err := load()
		if err != nil {
			return nil, nil, err
		}
		return func() { dst.p.Store(v) }, describe(v), nil
	}})
}

// reload rereads every item. On any failure it installs nothing, logs one
// error line naming the item, and its file and reason through err, and
// returns the error; on success it logs one line saying what it installed.
func (r *reloader) reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.items) == 0 {
		r.log.Info("SIGHUP: nothing to reload (no --tls-cert, CA or token file)")
		return nil
	}
	commits := make([]func(), 0, len(r.items))
	var attrs []any
	for _, it := range r.items {
		commit, a, err := it.prepare()
		if err != nil {
			err = fmt.Errorf("%s: %w", it.name, err)
			r.log.Error("reload refused: kept the certificates and tokens in use", "err", err)
			return err
		}
		commits = append(commits, commit)
		attrs = append(attrs, a...)
	}
	for _, commit := range commits {
		commit()
	}
	r.log.Info("reloaded: new connections, tunnels and calls use it; those open keep going", attrs...)
	return nil
}

// watch reloads on every SIGHUP until the returned function is called,
// which waits for a reload in progress. It takes SIGHUP for itself only
// while the command runs, beside main's SIGINT and SIGTERM handling, which
// it leaves alone; and since SIGHUP ends a process that does not handle
// it, it is taken even with nothing to reload, so that a stray SIGHUP does
// not stop a gateway that was started without TLS or tokens.
func (r *reloader) watch() (stop func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGHUP)
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-sigs:
				_ = r.reload() // reload logs its outcome
			case <-quit:
				return
			}
		}
	}()
	return func() {
		signal.Stop(sigs)
		close(quit)
		<-done
	}
}
