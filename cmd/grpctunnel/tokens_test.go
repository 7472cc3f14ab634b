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
