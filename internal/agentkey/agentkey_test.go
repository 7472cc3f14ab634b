package agentkey

import (
	"strings"
	"testing"
)

func TestProblem(t *testing.T) {
	for key, want := range map[string]string{
		"site-a":                      "",
		"thermostat 7":                "",
		"":                            "is empty",
		strings.Repeat("k", MaxLen):   "",
		strings.Repeat("k", MaxLen+1): "is too long",
		"\xff":                        "is not UTF-8",
		" a":                          "has surrounding spaces",
		"a,b":                         "contains a comma",
		"a\nb":                        "has characters that are not printable",
	} {
		if got := Problem(key); got != want {
			t.Errorf("Problem(%q) = %q, want %q", key, got, want)
		}
	}
}
