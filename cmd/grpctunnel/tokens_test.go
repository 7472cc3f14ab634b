package main

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const tokenFileText = `
# agents' tokens
  any-key-token
bound-token    sensor-1
# indented comments and trailing spaces are fine too
	tab-token	sensor-2   
`

func TestParseTokens(t *testing.T) {
	s, err := parseTokens(strings.NewReader(tokenFileText))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.tokens) != 3 {
		t.Fatalf("parsed %d tokens, want 3", len(s.tokens))
	}
	for i, want := range []string{"", "sensor-1", "sensor-2"} {
		if s.tokens[i].key != want {
			t.Errorf("token %d is bound to %q, want %q", i, s.tokens[i].key, want)
		}
	}

	for _, tc := range []struct{ text, want string }{
		{"", "no tokens"},
		{"# only a comment\n\n", "no tokens"},
		{"a\nt k extra\n", "line 2: want a token and at most one agent key, found 3 words"},
		{"t k1\n\nt k2\n", "line 3: the token of line 1 again"},
	} {
		_, err := parseTokens(strings.NewReader(tc.text))
		if err == nil || err.Error() != tc.want {
			t.Errorf("parseTokens(%q) = %v, want %q", tc.text, err, tc.want)
		}
	}
}

func TestAuthorize(t *testing.T) {
	s, err := parseTokens(strings.NewReader(tokenFileText))
	if err != nil {
		t.Fatal(err)
	}
	withAuth := func(values ...string) context.Context {
		md := metadata.MD{}
		for _, v := range values {
			md.Append("authorization", v)
		}
		return metadata.NewIncomingContext(context.Background(), md)
	}
	for _, tc := range []struct {
		name string
		ctx  context.Context
		key  string
		want codes.Code
	}{
		{"unbound token, any key", withAuth("Bearer any-key-token"), "whatever", codes.OK},
		{"scheme in another case", withAuth("bearer any-key-token"), "whatever", codes.OK},
		{"bound token, its key", withAuth("Bearer bound-token"), "sensor-1", codes.OK},
		{"tab-separated line", withAuth("Bearer tab-token"), "sensor-2", codes.OK},
		{"bound token, another key", withAuth("Bearer bound-token"), "sensor-2", codes.PermissionDenied},
		{"no metadata", context.Background(), "sensor-1", codes.Unauthenticated},
		{"no token", withAuth(), "sensor-1", codes.Unauthenticated},
		{"unknown token", withAuth("Bearer guess"), "sensor-1", codes.Unauthenticated},
		{"a prefix of a token", withAuth("Bearer bound"), "sensor-1", codes.Unauthenticated},
		{"token and key as in the file", withAuth("Bearer bound-token sensor-1"), "sensor-1", codes.Unauthenticated},
		{"another scheme", withAuth("Basic bound-token"), "sensor-1", codes.Unauthenticated},
		{"no scheme", withAuth("bound-token"), "sensor-1", codes.Unauthenticated},
		{"empty token", withAuth("Bearer "), "sensor-1", codes.Unauthenticated},
		{"two headers", withAuth("Bearer bound-token", "Bearer any-key-token"), "sensor-1", codes.Unauthenticated},
	} {
		err := s.authorize(tc.ctx, tc.key)
		if got := status.Code(err); got != tc.want {
			t.Errorf("%s: authorize = %v, want %v", tc.name, err, tc.want)
		}
	}
	// The refusal says what is wrong without echoing the token.
	err = s.authorize(withAuth("Bearer bound-token"), "sensor-2")
	if msg := status.Convert(err).Message(); !strings.Contains(msg, `may not open tunnels for agent key "sensor-2"`) || strings.Contains(msg, "bound-token") {
		t.Errorf("PermissionDenied message %q", msg)
	}
}

func TestReadAgentToken(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		text, want, err string
	}{
		{"s3cret\n", "s3cret", ""},
		{"# the token\n\n  s3cret  \nignored\n", "s3cret", ""},
		{"s3cret", "s3cret", ""},
		{"s3cret sensor-1\n", "", "the token line holds 2 words"},
		{"# nothing\n", "", "no token"},
	} {
		got, err := readAgentToken(writeFile(t, dir, "token", []byte(tc.text)))
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("readAgentToken(%q) = %q, %v; want %q", tc.text, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("readAgentToken(%q) = %q, %v; want an error with %q", tc.text, got, err, tc.err)
		}
	}
}

func TestAuthorizeCall(t *testing.T) {
	s, err := parseTokens(strings.NewReader(tokenFileText))
	if err != nil {
		t.Fatal(err)
	}
	with := func(value string) context.Context {
		return metadata.NewIncomingContext(context.Background(), metadata.Pairs(callerTokenHeader, value))
	}
	const call, health, admin = "/demo.v1.Service/Call", "/grpc.health.v1.Health/Check", "/grpctunnel.admin.v1.AdminService/ListAgents"
	for _, tc := range []struct {
		name   string
		ctx    context.Context
		method string
		keys   []string
		want   codes.Code
	}{
		{"unbound token, any agent", with("Bearer any-key-token"), call, []string{"x"}, codes.OK},
		{"unbound token, several agents", with("Bearer any-key-token"), call, []string{"x", "y"}, codes.OK},
		{"unbound token, the gateway's services", with("Bearer any-key-token"), admin, nil, codes.OK},
		{"bound token, its agent", with("Bearer bound-token"), call, []string{"sensor-1"}, codes.OK},
		{"bound token, another agent", with("Bearer bound-token"), call, []string{"sensor-2"}, codes.PermissionDenied},
		{"bound token, its agent and another", with("Bearer bound-token"), call, []string{"sensor-1", "sensor-2"}, codes.PermissionDenied},
		{"bound token, the agent list", with("Bearer bound-token"), admin, nil, codes.PermissionDenied},
		{"no token, the gateway's health", context.Background(), health, nil, codes.OK},
		{"no token, an agent's health", context.Background(), health, []string{"sensor-1"}, codes.Unauthenticated},
		{"no token, an agent", context.Background(), call, []string{"sensor-1"}, codes.Unauthenticated},
		{"the agents' header instead", metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer any-key-token")), call, []string{"x"}, codes.Unauthenticated},
		{"unknown token", with("Bearer guess"), call, []string{"sensor-1"}, codes.Unauthenticated},
	} {
		err := s.authorizeCall(tc.ctx, tc.method, tc.keys)
		if got := status.Code(err); got != tc.want {
			t.Errorf("%s: authorizeCall = %v, want %v", tc.name, err, tc.want)
		}
	}
}
