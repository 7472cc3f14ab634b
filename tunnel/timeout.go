package tunnel

import (
	"math"
	"strconv"
	"time"
)

// timeoutHeader carries a call's deadline, in gRPC's own format.
const timeoutHeader = "grpc-timeout"

// encodeTimeout writes d as gRPC does: at most eight digits and a unit,
// choosing the finest unit that fits so little precision is lost.
func encodeTimeout(d time.Duration) string {
	if d <= 0 {
		// Already expired; the smallest positive timeout lets the server
		// fail the call with DeadlineExceeded itself.
		return "1n"
	}
	const maxDigits = 99999999
	units := []struct {
		unit time.Duration
		code string
	}{
		{time.Nanosecond, "n"},
		{time.Microsecond, "u"},
		{time.Millisecond, "m"},
		{time.Second, "S"},
		{time.Minute, "M"},
		{time.Hour, "H"},
	}
	for _, u := range units {
		// Round up so the server never sees a shorter deadline.
		n := (d + u.unit - 1) / u.unit
		if n <= maxDigits {
			return strconv.FormatInt(int64(n), 10) + u.code
		}
	}
	return strconv.Itoa(maxDigits) + "H"
}

// decodeTimeout parses a grpc-timeout value.
func decodeTimeout(s string) (time.Duration, error) {
	if len(s) < 2 || len(s) > 9 {
		return 0, errMalformedTimeout(s)
	}
	var unit time.Duration
	switch s[len(s)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, errTimeoutUnit(s)
	}
	digits := s[:len(s)-1]
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, errMalformedTimeout(s)
		}
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil {
		return 0, errMalformedTimeout(s)
	}
	if n > math.MaxInt64/int64(unit) {
		return math.MaxInt64, nil
	}
	return time.Duration(n) * unit, nil
}
