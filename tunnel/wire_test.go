package tunnel

import (
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
)

func TestTimeoutRoundTrip(t *testing.T) {
	for _, d := range []time.Duration{
		time.Nanosecond, 999 * time.Nanosecond, 1500 * time.Microsecond, 3 * time.Second,
		100000 * time.Second, 10000 * time.Hour, 200000 * time.Hour,
	} {
		s := encodeTimeout(d)
		if len(s) > 9 {
			t.Fatalf("encodeTimeout(%v) = %q: more than 8 digits", d, s)
		}
		got, err := decodeTimeout(s)
		if err != nil {
			t.Fatalf("decodeTimeout(%q): %v", s, err)
		}
		if got < d {
			t.Fatalf("%v encoded as %q decodes to the shorter %v", d, s, got)
		}
	}
	if s := encodeTimeout(-time.Second); s != "1n" {
		t.Fatalf("an expired deadline encodes as %q", s)
	}
}

func TestDecodeTimeoutRejectsMalformed(t *testing.T) {
	for _, s := range []string{"", "1", "S", "123456789S", "12x", "-1S", "1.5S", "+1S"} {
		if _, err := decodeTimeout(s); err == nil {
			t.Errorf("decodeTimeout(%q) accepted", s)
		}
	}
	if d, err := decodeTimeout("99999999H"); err != nil || d <= 0 {
		t.Fatalf("largest timeout: %v, %v", d, err)
	}
}

func TestMetadataEncoding(t *testing.T) {
	md := metadata.MD{
		"Key":          {"a", "b"},
		"blob-bin":     {"\x00\xff"},
		"grpc-timeout": {"1S"},
		"content-type": {"x"},
	}
	pb, err := encodeMetadata(md, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := pb.GetMd()["grpc-timeout"]; ok {
		t.Fatal("reserved header encoded")
	}
	if got := pb.GetMd()["blob-bin"].GetVal()[0]; got != "AP8" {
		t.Fatalf("binary value encoded as %q", got)
	}
	back, err := decodeMetadata(pb, true)
	if err != nil {
		t.Fatal(err)
	}
	if back.Get("key")[1] != "b" || back.Get("blob-bin")[0] != "\x00\xff" || len(back) != 2 {
		t.Fatalf("round trip gave %v", back)
	}
	// Padded base64 from another encoder is accepted too.
	pb.Md["blob-bin"].Val[0] = "AP8="
	if back, err := decodeMetadata(pb, true); err != nil || back.Get("blob-bin")[0] != "\x00\xff" {
		t.Fatalf("padded value: %v, %v", back, err)
	}
	pb.Md["blob-bin"].Val[0] = "!!"
	if _, err := decodeMetadata(pb, true); err == nil {
		t.Fatal("invalid base64 accepted")
	}
	if _, err := encodeMetadata(metadata.Pairs("blob-bin", "\xff"), false); err == nil {
		t.Fatal("invalid UTF-8 accepted without the binary-metadata extension")
	}
}
