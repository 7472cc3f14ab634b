package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// opsServer is the small HTTP server a command runs beside its gRPC work
// for operators: metrics, health.
type opsServer struct {
	srv  *http.Server
	addr net.Addr
	done chan struct{} // closed when Serve has returned
}

// startOpsServer listens on addr and serves mux there until shutdown,
// logging "what listening" with the bound address, so that port 0 can be
// used; a server that stops on its own sends the reason to failed.
func startOpsServer(addr string, mux *http.ServeMux, what string, log *slog.Logger, failed chan<- error) (*opsServer, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	s := &opsServer{
		srv:  &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		addr: lis.Addr(),
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(lis); !errors.Is(err, http.ErrServerClosed) {
			select {
			case failed <- fmt.Errorf("%s: %w", what, err):
			default:
			}
		}
	}()
	log.Info(what+" listening", "addr", s.addr.String())
	return s, nil
}

// shutdown lets requests in progress finish for a moment, then closes the
// server, and returns once it has stopped.
func (s *opsServer) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	<-s.done
}
