package errtext

import (
	"strings"
	"testing"
)

func TestQuote(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"edge-1", `"edge-1"`},
		{"", `""`},
		{strings.Repeat("a", MaxQuoted), `"` + strings.Repeat("a", MaxQuoted) + `"`},
		{strings.Repeat("a", 1<<20), `"` + strings.Repeat("a", MaxQuoted) + `"... (1048576 bytes)`},
		// Cut before a character that would straddle the limit.
		{strings.Repeat("a", MaxQuoted-1) + "é" + "zz", `"` + strings.Repeat("a", MaxQuoted-1) + `"... (67 bytes)`},
	} {
		if got := Quote(tc.in); got != tc.want {
			t.Errorf("Quote(%.20q...) = %s, want %s", tc.in, got, tc.want)
		}
	}
	if got := QuoteAny(42); got != `"42"` {
		t.Errorf("QuoteAny(42) = %s", got)
	}
}
