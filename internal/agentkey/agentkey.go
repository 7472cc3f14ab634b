// Package agentkey holds the rule for what an agent's key may be, which
// the gateway enforces when an agent opens a tunnel and the agent checks
// when it starts, so that a key the gateway can never accept fails at once
// rather than on every reconnection.
package agentkey

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxLen bounds a key, which also becomes a metric label on the gateway.
const MaxLen = 256

// Problem returns what is wrong with key, as a phrase that completes "the
// key ...", or "" if the gateway accepts it: printable, without commas
// (which separate keys in a call) or surrounding spaces, and not too long.
func Problem(key string) string {
	switch {
	case key == "":
		return "is empty"
	case len(key) > MaxLen:
		return "is too long"
	case !utf8.ValidString(key):
		return "is not UTF-8"
	case strings.TrimSpace(key) != key:
		return "has surrounding spaces"
	case strings.ContainsRune(key, ','):
		return "contains a comma"
	case strings.IndexFunc(key, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0:
		return "has characters that are not printable"
	}
	return ""
}
