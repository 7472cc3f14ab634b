// Package errtext formats values that come from callers and peers for error
// messages and logs, so that what a status repeats stays readable and
// bounded whatever the value was.
package errtext

import (
	"fmt"
	"unicode/utf8"
)

// MaxQuoted bounds how many bytes of a value Quote repeats: enough to
// recognize it, never a whole header.
const MaxQuoted = 64

// Quote formats s in Go's quoted form, cut to MaxQuoted bytes (at a
// character boundary) with its full length said when it is longer, so that
// a hostile value cannot fill an error message or a log line.
func Quote(s string) string {
	if len(s) <= MaxQuoted {
		return fmt.Sprintf("%q", s)
	}
	cut := MaxQuoted
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%q... (%d bytes)", s[:cut], len(s))
}

// QuoteAny is Quote for a value of any type, formatted with %v first.
func QuoteAny(v any) string {
	if s, ok := v.(string); ok {
		return Quote(s)
	}
	return Quote(fmt.Sprint(v))
}
