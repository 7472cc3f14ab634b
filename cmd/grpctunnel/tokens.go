package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/internal/errtext"
)

// tokenSet is the gateway's --token-file: the tokens agents may present and
// the key each one is bound to.
type tokenSet struct {
	tokens []token
}

type token struct {
	// sum is the token's SHA-256: comparing digests of equal length keeps
	// the comparison's time independent of the token's length too.
	sum [sha256.Size]byte
	// key is the only agent key the token opens tunnels for; "" for any.
	key string
}

// loadTokens reads a gateway token file.
func loadTokens(file string) (*tokenSet, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("reading the token file: %w", err)
	}
	defer f.Close()
	s, err := parseTokens(f)
	if err != nil {
		return nil, fmt.Errorf("token file %s: %w", file, err)
	}
	return s, nil
}

// parseTokens reads one token per line, optionally followed by whitespace
// and the agent key it is bound to. Blank lines and lines starting with #
// are skipped.
func parseTokens(r io.Reader) (*tokenSet, error) {
	s := &tokenSet{}
	seen := map[[sha256.Size]byte]int{} // line of each token
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		fields, ok := tokenLine(sc.Text())
		if !ok {
			continue
		}
		if len(fields) > 2 {
			return nil, fmt.Errorf("line %d: want a token and at most one agent key, found %d words", n, len(fields))
		}
		t := token{sum: sha256.Sum256([]byte(fields[0]))}
		if len(fields) == 2 {
			t.key = fields[1]
		}
		// The same token twice, perhaps bound to two keys, is a mistake
		// that would otherwise be settled by which line came first.
		if prev, dup := seen[t.sum]; dup {
			return nil, fmt.Errorf("line %d: the token of line %d again", n, prev)
		}
		seen[t.sum] = n
		s.tokens = append(s.tokens, t)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(s.tokens) == 0 {
		// An empty file would lock every agent out: more likely the wrong
		// file than the wish.
		return nil, errors.New("no tokens")
	}
	return s, nil
}

// describe is the log's account of a reloaded token set: how many tokens,
// which tells an operator that the file read was the one meant, without
// writing a secret to the log.
func (s *tokenSet) describe(name string) []any { return []any{name, len(s.tokens)} }

// tokenLine splits a line of a token file into words; ok is false for a
// blank line or a comment.
func tokenLine(line string) (fields []string, ok bool) {
	line = strings.TrimSpace(line)
	if line == "" || strings.HasPrefix(line, "#") {
		return nil, false
	}
	return strings.Fields(line), true
}

// callerTokenHeader carries callers' tokens (--caller-token-file). It is
// not "authorization", which belongs to the service behind the agent and
// passes through unchanged.
const callerTokenHeader = "tunnel-authorization"

// authorize is the gateway's AuthorizeAgent: the opening RPC must carry
// "authorization: Bearer <token>" with a token of the set that is not bound
// to another key.
func (s *tokenSet) authorize(ctx context.Context, key string) error {
	match, err := s.match(ctx, "authorization", "an agent")
	if err != nil {
		return err
	}
	if match.key != "" && match.key != key {
		return gateway.Refuse(gateway.ReasonKeyNotAllowed, status.Errorf(codes.PermissionDenied, "grpctunnel gateway: this token may not open tunnels for agent key %s", errtext.Quote(key)))
	}
	return nil
}

// authorizeCall is the gateway's AuthorizeCall: a call must carry
// "tunnel-authorization: Bearer <token>" with a token of the set, and a
// token bound to a key may call that agent only, not the gateway's own
// services, which list every agent. Health checks need no token, so that
// load balancers can probe the gateway.
func (s *tokenSet) authorizeCall(ctx context.Context, method string, keys []string) error {
	if len(keys) == 0 && strings.HasPrefix(method, "/grpc.health.v1.Health/") {
		return nil
	}
	match, err := s.match(ctx, callerTokenHeader, "a caller")
	if err != nil {
		return err
	}
	if match.key == "" {
		return nil
	}
	if len(keys) == 0 {
		return gateway.Refuse(gateway.ReasonKeyNotAllowed, status.Errorf(codes.PermissionDenied, "grpctunnel gateway: this token may call agent %q only", match.key))
	}
	for _, k := range keys {
		if k != match.key {
			// k is the caller's: quoted within bounds.
			return gateway.Refuse(gateway.ReasonKeyNotAllowed, status.Errorf(codes.PermissionDenied, "grpctunnel gateway: this token may not call agent %s", errtext.Quote(k)))
		}
	}
	return nil
}

// match finds the token that header presents, for who. Its refusals say
// why (gateway.Refuse), for the gateway's log and refusal metric.
func (s *tokenSet) match(ctx context.Context, header, who string) (*token, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get(header)
	if len(values) == 0 {
		return nil, gateway.Refuse(gateway.ReasonNoToken, status.Errorf(codes.Unauthenticated, "grpctunnel gateway: %s must present a token (%s: Bearer <token>)", who, header))
	}
	scheme, presented, ok := strings.Cut(values[0], " ")
	presented = strings.TrimSpace(presented)
	if len(values) > 1 || !ok || !strings.EqualFold(scheme, "Bearer") || presented == "" {
		return nil, gateway.Refuse(gateway.ReasonBadToken, status.Errorf(codes.Unauthenticated, "grpctunnel gateway: the %s header must be one \"Bearer <token>\"", header))
	}
	sum := sha256.Sum256([]byte(presented))
	var match *token
	// Every token is compared, so that the time taken does not tell how
	// many tokens precede the presented one, nor which one matched.
	for i := range s.tokens {
		if subtle.ConstantTimeCompare(sum[:], s.tokens[i].sum[:]) == 1 {
			match = &s.tokens[i]
		}
	}
	if match == nil {
		return nil, gateway.Refuse(gateway.ReasonBadToken, status.Error(codes.Unauthenticated, "grpctunnel gateway: unknown token"))
	}
	return match, nil
}

// readAgentToken reads the agent's --token-file: its first line that is
// neither blank nor a comment is the token.
func readAgentToken(file string) (string, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("reading the token file: %w", err)
	}
	for line := range strings.Lines(string(data)) {
		fields, ok := tokenLine(line)
		if !ok {
			continue
		}
		if len(fields) != 1 {
			// Perhaps a line copied from the gateway's file with its key:
			// sending the whole line would fail with a puzzling
			// Unauthenticated, so say so here.
			return "", fmt.Errorf("token file %s: the token line holds %d words; it must hold only the token", file, len(fields))
		}
		return fields[0], nil
	}
	return "", fmt.Errorf("token file %s: no token", file)
}

// bearerToken sends a token with every opening RPC, as per-RPC
// credentials.
type bearerToken struct {
	token string
	// insecure lets the token travel without TLS (--insecure-token);
	// otherwise gRPC refuses to send it on a plaintext connection.
	insecure bool
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (b bearerToken) RequireTransportSecurity() bool { return !b.insecure }

// reloadingBearer is bearerToken with a token that a reload may replace:
// every opening RPC sends the token current at that moment, so that the
// agent's next tunnels present the new one while those open stay open.
type reloadingBearer struct {
	token    *reloadable[string]
	insecure bool
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (b reloadingBearer) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
	return bearerToken{token: *b.token.load()}.GetRequestMetadata(ctx, uri...)
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (b reloadingBearer) RequireTransportSecurity() bool { return !b.insecure }
