package tunnel

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/flowcontrol"
)

// TestErrorsKeepTheirCause checks that the package's errors built from
// another keep it: in the text, and for errors.Is where they can wrap.
func TestErrorsKeepTheirCause(t *testing.T) {
	broke := errors.New("connection reset")
	err := tunnelFailed(broke)
	if status.Code(err) != codes.Unavailable || !errors.Is(err, broke) || status.Convert(err).Message() != "grpctunnel: tunnel failed: connection reset" {
		t.Errorf("tunnelFailed(%v) = %v (code %v, is cause %v)", broke, err, status.Code(err), errors.Is(err, broke))
	}
	// A cause that is a status of this package is not prefixed twice.
	err = tunnelFailed(errQueueFull)
	if msg := status.Convert(err).Message(); strings.Count(msg, "grpctunnel:") != 1 || !strings.Contains(msg, "does not read the frames") {
		t.Errorf("tunnelFailed(errQueueFull) message %q", msg)
	}
	if err := windowOverrun(flowcontrol.ErrOverrun); status.Code(err) != codes.ResourceExhausted || !errors.Is(err, flowcontrol.ErrOverrun) {
		t.Errorf("windowOverrun = %v", err)
	}
	if err := windowOverflow(flowcontrol.ErrOverflow); status.Code(err) != codes.Internal || !errors.Is(err, flowcontrol.ErrOverflow) {
		t.Errorf("windowOverflow = %v", err)
	}
	if err := unstarted(errTooManyStreams); !neverLeft(err) || !errors.Is(err, errTooManyStreams) || status.Code(err) != codes.ResourceExhausted {
		t.Errorf("unstarted(errTooManyStreams) = %v", err)
	}
}

// TestErrorTexts checks that every error value of the package says where
// it comes from.
func TestErrorTexts(t *testing.T) {
	for _, err := range []error{
		ErrServerStopped, ErrGivenBack, errTunnelClosed, errPeerClosed, errPoolClosed,
		errShuttingDown, errTooManyStreams, errTooManyForKey, errBudget, errQueueFull,
		errStreamClosed, errDone, protocolErrorf("x"),
		errNoForwardServices, errNoReverseTunnels, errTooManyReverse, errKeyNotComparable([]int(nil)),
		errTunnelShuttingDown("tunnel"), errTunnelEnded("tunnel", nil), errAllReverseBusy(""), errNoReverseTunnel(""),
		errGivenBackFor(errNoReasonGiven), protocolErrorf("%v", errNoCommonRevision(nil, supportedRevisions)),
		errUnsupportedRevision(7), errMalformedMethod("x"), errUnknownService("x"), errUnknownMethod("m", "s"),
		errNoResponse, errExtraResponse, errSecondResponse, errNoRequest,
		errMessageStartedTwice, errDataWithoutMessage, errFirstChunkOverruns(2, 1), errChunkOverruns(1),
		errMessageTooLarge("request", 2, 1), errSendTooLarge(2, 1), errDecompressedTooLarge(1), errMetadataTooLarge(2, 1),
		errNoCodec("x"), errMarshal(errors.New("x")), errUnmarshal("request", errors.New("x")),
		errNoCompressor("x"), errNoDecompressor(codes.Internal, "x"), errCompress(errors.New("x")), errDecompress(errors.New("x")),
		errMetadataOut(errMetadataNotUTF8("k")), errHeaderIn(errMetadataBase64("k-bin", errors.New("x"))),
		errHeaderIn(errMalformedTimeout("x")), errHeaderIn(errTimeoutUnit("1x")),
		errInsecureCredentials, errCredentials(errors.New("x")), errKeepalive(0),
	} {
		msg := err.Error()
		if s, ok := status.FromError(err); ok {
			msg = s.Message()
		}
		if !strings.HasPrefix(msg, "grpctunnel: ") {
			t.Errorf("%q does not start with grpctunnel:", msg)
		}
	}
}

// TestErrorsOthersRead checks the texts and causes that other code relies
// on: the gateway's recognition of some refusals, and errors.Is on a tunnel
// given back and on metadata that is not base64.
func TestErrorsOthersRead(t *testing.T) {
	if msg := status.Convert(errTooManyReverse).Message(); !strings.Contains(msg, "(see MaxReverseTunnels") {
		t.Errorf("errTooManyReverse message %q", msg)
	}
	for _, kind := range []string{"request", "response"} {
		want := "received " + kind + " message larger than max"
		if msg := strings.TrimPrefix(status.Convert(errMessageTooLarge(kind, 2, 1)).Message(), "grpctunnel: "); !strings.HasPrefix(msg, want) {
			t.Errorf("errMessageTooLarge(%q) message %q; want it to start with %q", kind, msg, want)
		}
	}
	reason := errors.New("spread")
	if err := errGivenBackFor(reason); !errors.Is(err, ErrGivenBack) || !errors.Is(err, reason) || err.Error() != "grpctunnel: tunnel given back by the client: spread" {
		t.Errorf("errGivenBackFor(%v) = %v", reason, err)
	}
	bad := errors.New("illegal base64 data")
	if err := errMetadataBase64("k-bin", bad); !errors.Is(err, bad) {
		t.Errorf("errMetadataBase64 = %v, does not wrap its cause", err)
	}
}
