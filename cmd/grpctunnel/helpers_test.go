package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine outlives the tests: every
// subcommand promises to stop all it started before it returns.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitTimeout bounds every wait in these tests, so that a broken tunnel
// fails a test instead of hanging it. Nothing waits for it to pass.
const waitTimeout = 20 * time.Second

// logBuffer collects what a command writes and lets a test wait for a
// line. Commands write from many goroutines, and subprocesses through a
// pipe, so it is safe for concurrent use.
type logBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newLogBuffer() *logBuffer { return &logBuffer{changed: make(chan struct{})} }

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	close(b.changed)
	b.changed = make(chan struct{})
	return len(p), nil
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// snapshot returns the complete lines so far and a channel closed at the
// next write.
func (b *logBuffer) snapshot() ([]string, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b.buf.Bytes()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if n := b.buf.Len(); n > 0 && b.buf.Bytes()[n-1] != '\n' && len(lines) > 0 {
		lines = lines[:len(lines)-1] // not finished yet
	}
	return lines, b.changed
}

// records returns the JSON log records written so far, skipping lines that
// are not JSON objects.
func (b *logBuffer) records() ([]map[string]any, <-chan struct{}) {
	lines, changed := b.snapshot()
	var recs []map[string]any
	for _, l := range lines {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) == nil {
			recs = append(recs, rec)
		}
	}
	return recs, changed
}

// waitRecord waits until a JSON record satisfies match and returns it; what
// describes the record for the failure message.
func (b *logBuffer) waitRecord(t testing.TB, ctx context.Context, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	for {
		recs, changed := b.records()
		for _, r := range recs {
			if match(r) {
				return r
			}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("no log record %s before %v; the log:\n%s", what, ctx.Err(), b.String())
		}
	}
}

// waitMsg waits for the JSON record whose message is msg.
func (b *logBuffer) waitMsg(t testing.TB, ctx context.Context, msg string) map[string]any {
	t.Helper()
	return b.waitRecord(t, ctx, "with msg "+msg, func(r map[string]any) bool { return r["msg"] == msg })
}

// inProcess is a subcommand running in the test's process.
type inProcess struct {
	stdout, stderr *logBuffer
	cancel         context.CancelFunc
	code           chan int
}

// startInProcess runs a subcommand until stop or the end of the test.
func startInProcess(t *testing.T, run func(context.Context, []string, io.Writer, io.Writer) int, args ...string) *inProcess {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &inProcess{stdout: newLogBuffer(), stderr: newLogBuffer(), cancel: cancel, code: make(chan int, 1)}
	go func() { p.code <- run(ctx, args, p.stdout, p.stderr) }()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// stop signals the command, as the first SIGINT would, and returns its
// exit status.
func (p *inProcess) stop(t *testing.T) int {
	t.Helper()
	p.cancel()
	select {
	case code := <-p.code:
		p.code <- code // for a later stop, such as the cleanup's
		return code
	case <-time.After(waitTimeout):
		t.Fatalf("the command did not stop within %v; its log:\n%s", waitTimeout, p.stderr.String())
		return -1
	}
}

// testContext ends with the test or after waitTimeout.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// writeFile writes data to a new file in dir and returns its path.
func writeFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// testCA is a throwaway certificate authority whose certificates go to PEM
// files, as the command reads them. Nothing is committed.
type testCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	dir     string
	pemFile string // the CA's certificate
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	ca := &testCA{key: newKey(t), dir: t.TempDir()}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &ca.key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	if ca.cert, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	ca.pemFile = writeFile(t, ca.dir, name+"-ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	return ca
}

// serverCert issues a certificate for 127.0.0.1 and localhost and returns
// the certificate and key files.
func (ca *testCA) serverCert(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	return ca.issue(t, "server", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "gateway"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
}

// clientCert issues a client certificate for cn.
func (ca *testCA) clientCert(t *testing.T, cn string) (certFile, keyFile string) {
	t.Helper()
	return ca.issue(t, cn, &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
}

func (ca *testCA) issue(t *testing.T, name string, tmpl *x509.Certificate) (certFile, keyFile string) {
	t.Helper()
	key := newKey(t)
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile = writeFile(t, ca.dir, name+".pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	keyFile = writeFile(t, ca.dir, name+"-key.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	return certFile, keyFile
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func serial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
