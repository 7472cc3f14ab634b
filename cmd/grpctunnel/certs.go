package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Validity defaults. 825 days is the longest validity that Apple's
// platforms accept for a TLS server certificate, so a gateway certificate
// of that age works with every common client; agents and callers get the
// same so that one run's certificates expire together and are renewed
// together. The CA lives ten years, so that leaves can be reissued under it
// several times over without redistributing ca.crt.
const (
	defaultLeafDays = 825
	defaultCADays   = 3650
)

// certBackdate is how far before now the certificates become valid: a
// device behind NAT whose clock runs a little behind would otherwise
// refuse, or be refused with, a certificate made a moment ago.
const certBackdate = time.Hour

// tokenBytes is the entropy of each token: 256 bits, beyond guessing.
const tokenBytes = 32

// maxNameLen bounds agent keys and caller names: they become a
// certificate's common name, which RFC 5280 limits to 64 characters.
const maxNameLen = 64

// certsConfig is the certs command's command line.
type certsConfig struct {
	dir     string
	hosts   []string
	agents  []string
	callers []string
	days    int
	caDays  int
	force   bool
}

// The files a run writes, in dir. Agents' and callers' files are named
// after them with these prefixes, so that an agent and a caller of the same
// name could not overwrite each other's files (runCerts refuses such a
// pair anyway).
const (
	caCertFile       = "ca.crt"
	caKeyFile        = "ca.key"
	gatewayCertFile  = "gateway.crt"
	gatewayKeyFile   = "gateway.key"
	agentTokensFile  = "agent-tokens.txt"
	callerTokensFile = "caller-tokens.txt"
	agentFilePrefix  = "agent-"
	callerFilePrefix = "caller-"
)

// Their modes: certificates are public; private keys and tokens, and the
// directory, are for their owner only.
const (
	certMode     = 0o644
	secretMode   = 0o600
	certsDirMode = 0o700
)

// The printed commands' gateway port and agents' target, examples both.
const (
	exampleGatewayPort = "8443"
	exampleTarget      = "localhost:50051"
)

// runCerts is the certs command: it makes a CA and, under it, everything a
// gateway with mutual TLS, --agent-key-from-cert and tokens for agents and
// callers needs, so that a secure deployment needs no openssl.
func runCerts(_ context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg certsConfig
	var hosts, agents, callers string
	c := newCLI("certs", "grpctunnel certs --dir DIR --agents KEY,... --callers NAME,... [flags]",
		"Writes, in DIR, a CA (ca.crt, ca.key), the gateway's certificate for --hosts\n"+
			"(gateway.crt, gateway.key), a client certificate and a token for each agent\n"+
			"key (agent-KEY.crt, .key, .token) and each caller (caller-NAME.crt, .key,\n"+
			".token), and the gateway's token files (agent-tokens.txt, each token bound\n"+
			"to its agent's key, and caller-tokens.txt). An agent's certificate names its\n"+
			"key as common name, as --agent-key-from-cert wants. Keys are ECDSA P-256;\n"+
			"private keys and tokens are readable by their owner only. Then it prints\n"+
			"the commands that use them. Existing files are left alone unless --force.",
		stdout, stderr)
	fs := c.fs
	fs.StringVar(&cfg.dir, "dir", "", "write the files into `directory`, made (mode 0700) if missing (required)")
	fs.StringVar(&hosts, "hosts", "localhost,127.0.0.1", "make the gateway's certificate for these DNS `names` and IP addresses,\ncomma-separated: every name agents and callers dial it by")
	fs.StringVar(&agents, "agents", "", "make a client certificate and a token for each of these agent `keys`,\ncomma-separated (required)")
	fs.StringVar(&callers, "callers", "", "make a client certificate and a token for each of these caller `names`,\ncomma-separated (required)")
	fs.IntVar(&cfg.days, "days", defaultLeafDays, "make the gateway's, agents' and callers' certificates valid for `n` days;\nthe default is the most Apple's platforms accept for a server's")
	fs.IntVar(&cfg.caDays, "ca-days", defaultCADays, "make the CA valid for `n` days; at least --days")
	fs.BoolVar(&cfg.force, "force", false, "replace files that already exist in the directory")
	if code, ok := c.parse(args); !ok {
		return code
	}
	if code, ok := c.requireFlags("dir", "agents", "callers"); !ok {
		return code
	}
	var err error
	if cfg.hosts, err = splitList(hosts, "--hosts", checkHost); err != nil {
		return c.fail("%v", err)
	}
	if cfg.agents, err = splitList(agents, "--agents", checkName); err != nil {
		return c.fail("%v", err)
	}
	if cfg.callers, err = splitList(callers, "--callers", checkName); err != nil {
		return c.fail("%v", err)
	}
	switch {
	case len(cfg.hosts) == 0:
		return c.fail("--hosts names no host")
	case len(cfg.agents) == 0:
		return c.fail("--agents names no agent key")
	case len(cfg.callers) == 0:
		return c.fail("--callers names no caller")
	case cfg.days <= 0:
		return c.fail("--days must be positive")
	case cfg.caDays < cfg.days:
		return c.fail("--ca-days must be at least --days: certificates outliving their CA fail when it expires")
	}
	for _, a := range cfg.agents {
		for _, n := range cfg.callers {
			if a == n {
				// The gateway cannot tell an agent's certificate from a
				// caller's: a caller named like an agent would hold a
				// certificate that passes --agent-key-from-cert for its key.
				return c.fail("%q is both an agent key and a caller name: a caller's certificate would name the agent's key", a)
			}
		}
	}

	files, err := makeCerts(cfg, time.Now())
	var dirMode os.FileMode
	if err == nil {
		dirMode, err = writeCertFiles(cfg.dir, files, cfg.force)
	}
	if err != nil {
		fmt.Fprintln(stderr, "grpctunnel certs:", err)
		return 1
	}
	printCertsSummary(stdout, cfg, files, dirMode)
	return 0
}

// splitList splits a comma-separated flag value, skipping empty items (a
// trailing comma is no mistake worth stopping for) and refusing duplicates
// and items check refuses.
func splitList(value, flag string, check func(string) error) ([]string, error) {
	var items []string
	seen := map[string]bool{}
	for item := range strings.SplitSeq(value, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if err := check(item); err != nil {
			return nil, fmt.Errorf("%s: %w", flag, err)
		}
		if seen[item] {
			return nil, fmt.Errorf("%s: %q twice", flag, item)
		}
		seen[item] = true
		items = append(items, item)
	}
	return items, nil
}

// checkName accepts an agent key or a caller name that can be a file name,
// a word of a token file (which splits on spaces), a common name, and an
// argument in the printed commands without quoting: letters, digits, '.',
// '-' and '_', not starting with '.' or '-'. The gateway accepts more keys
// than this; certificates for those can still be made by other means.
func checkName(name string) error {
	switch {
	case len(name) > maxNameLen:
		return fmt.Errorf("%q is longer than %d bytes, the most a certificate's common name holds", name, maxNameLen)
	case name[0] == '.' || name[0] == '-':
		return fmt.Errorf("%q starts with %q", name, name[0])
	}
	for _, r := range name {
		if !isNameChar(r) {
			return fmt.Errorf("%q has %q: use letters, digits, '.', '-' and '_'", name, r)
		}
	}
	return nil
}

func isNameChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_'
}

// checkHost accepts an IP address or a DNS name (a leading "*." for a
// wildcard), without a port: what a certificate's subject alternative names
// hold and a client matches the address it dials against.
func checkHost(host string) error {
	if net.ParseIP(host) != nil {
		return nil
	}
	if _, _, err := net.SplitHostPort(host); err == nil {
		return fmt.Errorf("%q has a port: give names and addresses only", host)
	}
	name := strings.TrimPrefix(host, "*.")
	if len(name) > 253 {
		return fmt.Errorf("%q is too long for a DNS name", host)
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%q is neither an IP address nor a DNS name", host)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("%q is neither an IP address nor a DNS name", host)
			}
		}
	}
	return nil
}

// certFile is one file to write: its name in the directory, its contents
// and its mode.
type certFile struct {
	name string
	data []byte
	mode os.FileMode
}

// makeCerts makes every key, certificate and token of cfg in memory, so
// that a failure leaves nothing half written, and returns the files to
// write.
func makeCerts(cfg certsConfig, now time.Time) ([]certFile, error) {
	ca, err := newCertAuthority(now, cfg.caDays)
	if err != nil {
		return nil, err
	}
	files := []certFile{
		{caCertFile, ca.certPEM, certMode},
		{caKeyFile, ca.keyPEM, secretMode},
	}
	issue := func(base string, tmpl *x509.Certificate) error {
		certPEM, keyPEM, err := ca.issue(tmpl, now, cfg.days)
		if err != nil {
			return fmt.Errorf("making %s.crt: %w", base, err)
		}
		files = append(files, certFile{base + ".crt", certPEM, certMode}, certFile{base + ".key", keyPEM, secretMode})
		return nil
	}

	gw := &x509.Certificate{
		// Clients match the names, not the common name; it only makes the
		// certificate recognisable.
		Subject: pkix.Name{CommonName: cfg.hosts[0], OrganizationalUnit: []string{"gateway"}, Organization: []string{"grpctunnel"}},
		// Client authentication too: the replicas of a cluster present
		// it to each other's peer ports (see peerTLS).
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range cfg.hosts {
		if ip := net.ParseIP(h); ip != nil {
			gw.IPAddresses = append(gw.IPAddresses, ip)
		} else {
			gw.DNSNames = append(gw.DNSNames, h)
		}
	}
	if err := issue("gateway", gw); err != nil {
		return nil, err
	}

	// The gateway's token files start with a comment that says what they
	// are, since they sit beside others that look alike.
	agentTokens := []byte("# grpctunnel gateway --token-file: each agent's token and the one key it may open tunnels for\n")
	for _, key := range cfg.agents {
		// The key is the common name, which --agent-key-from-cert
		// (gateway.CertificateNamesKey) accepts for that key alone. It is
		// not also a DNS name: the certificate is a client's, and a key
		// need not be a host name.
		if err := issue(agentFilePrefix+key, clientTemplate(key, "agent")); err != nil {
			return nil, err
		}
		tok, err := newToken()
		if err != nil {
			return nil, err
		}
		agentTokens = fmt.Appendf(agentTokens, "%s %s\n", tok, key)
		// The agent's file holds the token alone: readAgentToken refuses
		// a line with the key after it.
		files = append(files, certFile{agentFilePrefix + key + ".token", []byte(tok + "\n"), secretMode})
	}
	files = append(files, certFile{agentTokensFile, agentTokens, secretMode})

	callerTokens := []byte("# grpctunnel gateway --caller-token-file: callers' tokens, each for every agent and the admin service\n")
	for _, name := range cfg.callers {
		if err := issue(callerFilePrefix+name, clientTemplate(name, "caller")); err != nil {
			return nil, err
		}
		tok, err := newToken()
		if err != nil {
			return nil, err
		}
		// A comment of its own line names the caller: the gateway reads
		// a second word on the token's line as an agent key.
		callerTokens = fmt.Appendf(callerTokens, "# %s\n%s\n", name, tok)
		// The token alone, so that $(cat file) is the header's value.
		files = append(files, certFile{callerFilePrefix + name + ".token", []byte(tok + "\n"), secretMode})
	}
	files = append(files, certFile{callerTokensFile, callerTokens, secretMode})
	return files, nil
}

// clientTemplate is a client certificate for name; role (agent or caller)
// goes in the organizational unit, so that the identity the gateway logs
// and lists says which it is.
func clientTemplate(name, role string) *x509.Certificate {
	return &x509.Certificate{
		Subject:     pkix.Name{CommonName: name, OrganizationalUnit: []string{role}, Organization: []string{"grpctunnel"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

// certAuthority is the CA a run makes and signs the other certificates
// with.
type certAuthority struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
	keyPEM  []byte
}

// newCertAuthority makes a self-signed CA valid for days from now.
func newCertAuthority(now time.Time, days int) (*certAuthority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("making the CA's key: %w", err)
	}
	sn, err := serialNumber()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		// The date tells this CA from those of earlier runs, which a
		// client that trusts the wrong ca.crt would otherwise name alike
		// in its errors.
		Subject:               pkix.Name{CommonName: "grpctunnel CA " + now.UTC().Format(time.DateOnly), Organization: []string{"grpctunnel"}},
		NotBefore:             now.Add(-certBackdate),
		NotAfter:              now.AddDate(0, 0, days),
		IsCA:                  true,
		BasicConstraintsValid: true,
		// It signs leaves only: no intermediate CA can be made under it.
		MaxPathLenZero: true,
		KeyUsage:       x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("making the CA's certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("making the CA's certificate: %w", err)
	}
	keyPEM, err := privateKeyPEM(key)
	if err != nil {
		return nil, err
	}
	return &certAuthority{cert: cert, key: key, certPEM: certificatePEM(der), keyPEM: keyPEM}, nil
}

// issue makes a key and a certificate of tmpl for it, signed by the CA and
// valid for days from now, and returns both as PEM.
func (ca *certAuthority) issue(tmpl *x509.Certificate, now time.Time, days int) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	if tmpl.SerialNumber, err = serialNumber(); err != nil {
		return nil, nil, err
	}
	tmpl.NotBefore = now.Add(-certBackdate)
	tmpl.NotAfter = now.AddDate(0, 0, days)
	// An ECDSA key signs; it never enciphers keys.
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	if keyPEM, err = privateKeyPEM(key); err != nil {
		return nil, nil, err
	}
	return certificatePEM(der), keyPEM, nil
}

// serialNumber is a random 128-bit serial number, unique without a record
// of those issued before.
func serialNumber() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("making a serial number: %w", err)
	}
	return n, nil
}

func certificatePEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// privateKeyPEM encodes key as PKCS #8, which Go, grpcurl and openssl all
// read.
func privateKeyPEM(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding a private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// newToken is a random token, base64url without padding: no spaces or '#'
// that the token files would read as something else, and nothing a shell
// or an HTTP header would mangle.
func newToken() (string, error) {
	b := make([]byte, tokenBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("making a token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// writeCertFiles writes files into dir, making it (mode 0700) if needed.
// Without force it first checks that none of them exists, so that a second
// run cannot replace a CA that certificates in use were signed by, nor
// leave a mix of two runs' files. It returns the mode of a directory that
// was there already and that others may enter, for the summary to mention;
// 0 otherwise.
func writeCertFiles(dir string, files []certFile, force bool) (os.FileMode, error) {
	var open os.FileMode
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, certsDirMode); err != nil {
			return 0, fmt.Errorf("making the directory: %w", err)
		}
	case err != nil:
		return 0, err
	case !fi.IsDir():
		return 0, fmt.Errorf("%s is not a directory", dir)
	case fi.Mode().Perm()&0o077 != 0:
		// An existing directory keeps its mode: it may be the working
		// directory, or shared on purpose, and the secrets' own modes
		// protect them.
		open = fi.Mode().Perm()
	}
	return open, writeNewFiles(dir, files, force)
}

// writeNewFiles is writeCertFiles once dir exists.
func writeNewFiles(dir string, files []certFile, force bool) error {
	if !force {
		var exist []string
		for _, f := range files {
			if _, err := os.Lstat(filepath.Join(dir, f.name)); err == nil {
				exist = append(exist, f.name)
			} else if !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		if len(exist) > 0 {
			list := strings.Join(exist, ", ")
			if len(exist) > 3 {
				list = fmt.Sprintf("%s and %d more of the files to write", strings.Join(exist[:3], ", "), len(exist)-3)
			}
			return fmt.Errorf("%s already holds %s; wrote nothing (--force replaces them)", dir, list)
		}
	}
	for _, f := range files {
		if err := writeCertFile(filepath.Join(dir, f.name), f.data, f.mode, force); err != nil {
			return fmt.Errorf("writing %s: %w (the directory now holds an incomplete set)", f.name, err)
		}
	}
	return nil
}

// writeCertFile writes data to a file of mode at path. The mode is set
// explicitly, so that the umask cannot narrow a certificate's nor an old
// file's mode survive. Without replace the file must be new (O_EXCL, which
// does not follow a symlink either); with it, a temporary file is renamed
// over the old one, which replaces a symlink rather than writing where it
// points.
func writeCertFile(path string, data []byte, mode os.FileMode, replace bool) (err error) {
	var f *os.File
	if replace {
		f, err = os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	} else {
		f, err = os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, secretMode)
	}
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if replace {
		return os.Rename(f.Name(), path)
	}
	return nil
}

// printCertsSummary lists what was written, and how the directory was
// found if others may enter it (dirMode), and the commands that use the
// files, with their real names. The address and the target are examples.
func printCertsSummary(w io.Writer, cfg certsConfig, files []certFile, dirMode os.FileMode) {
	path := func(name string) string { return shellQuote(filepath.Join(cfg.dir, name)) }
	fmt.Fprintf(w, "Wrote %d files to %s:\n", len(files), cfg.dir)
	width := 0
	for _, f := range files {
		width = max(width, len(f.name))
	}
	for _, f := range files {
		fmt.Fprintf(w, "  %-*s  %s\n", width, f.name, fileRole(f.name))
	}
	if dirMode != 0 {
		fmt.Fprintf(w, "The directory was there already, with mode %#o, and keeps it: others may list\nit, though not read the keys and tokens (0600). chmod 700 closes it.\n", dirMode)
	}
	host := cfg.hosts[0]
	// A name of the certificate, so that clients can verify it; the
	// gateway listens on loopback only when that is where clients find it.
	addr := net.JoinHostPort(host, exampleGatewayPort)
	listen := ":" + exampleGatewayPort
	if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		listen = addr
	}
	if strings.HasPrefix(host, "*.") {
		addr = net.JoinHostPort("gw"+host[1:], exampleGatewayPort)
	}
	fmt.Fprintf(w, "\nThe gateway (port %s is an example; agents and callers must dial it by a\nname of --hosts):\n\n", exampleGatewayPort)
	fmt.Fprintf(w, "  grpctunnel gateway --listen %s \\\n", listen)
	fmt.Fprintf(w, "      --tls-cert %s --tls-key %s \\\n", path(gatewayCertFile), path(gatewayKeyFile))
	fmt.Fprintf(w, "      --client-ca %s --agent-key-from-cert \\\n", path(caCertFile))
	fmt.Fprintf(w, "      --token-file %s --caller-token-file %s\n", path(agentTokensFile), path(callerTokensFile))
	fmt.Fprintf(w, "\nEach agent, next to its service (%s is an example):\n", exampleTarget)
	for _, key := range cfg.agents {
		base := agentFilePrefix + key
		fmt.Fprintf(w, "\n  grpctunnel agent --gateway %s --key %s --target %s \\\n", addr, key, exampleTarget)
		fmt.Fprintf(w, "      --ca %s --tls-cert %s --tls-key %s \\\n", path(caCertFile), path(base+".crt"), path(base+".key"))
		fmt.Fprintf(w, "      --token-file %s\n", path(base+".token"))
	}
	caller := callerFilePrefix + cfg.callers[0]
	fmt.Fprintf(w, "\nA caller (%s), through agent %s, then the gateway's own list of agents:\n\n", cfg.callers[0], cfg.agents[0])
	callerArgs := fmt.Sprintf("grpcurl -cacert %s -cert %s -key %s \\\n      -H \"%s: Bearer $(cat %s)\"",
		path(caCertFile), path(caller+".crt"), path(caller+".key"), callerTokenHeader, path(caller+".token"))
	fmt.Fprintf(w, "  %s \\\n      -H 'tunnel-key: %s' %s list\n", callerArgs, cfg.agents[0], addr)
	fmt.Fprintf(w, "  %s \\\n      %s grpctunnel.admin.v1.AdminService/ListAgents\n", callerArgs, addr)
	fmt.Fprintf(w, "\nCopy %s, %s, %s and the two token files to the gateway, and\n"+
		"%s and its own files to each agent and caller. Keep %s here, or offline:\n"+
		"whoever holds it can issue certificates the gateway accepts.\n", gatewayCertFile, gatewayKeyFile, caCertFile, caCertFile, caKeyFile)
}

// fileRole says what a file of the set is for, in the summary.
func fileRole(name string) string {
	switch name {
	case caCertFile:
		return "the CA: the gateway's --client-ca, agents' --ca, callers' -cacert"
	case caKeyFile:
		return "the CA's private key, which signed the rest"
	case gatewayCertFile:
		return "the gateway's --tls-cert"
	case gatewayKeyFile:
		return "the gateway's --tls-key"
	case agentTokensFile:
		return "the gateway's --token-file"
	case callerTokensFile:
		return "the gateway's --caller-token-file"
	}
	whose, flags := "agent", map[string]string{".crt": "--tls-cert", ".key": "--tls-key", ".token": "--token-file"}
	rest, ok := strings.CutPrefix(name, agentFilePrefix)
	if !ok {
		rest, _ = strings.CutPrefix(name, callerFilePrefix)
		whose, flags = "caller", map[string]string{".crt": "grpcurl -cert", ".key": "grpcurl -key", ".token": "token for the " + callerTokenHeader + " header"}
	}
	ext := filepath.Ext(rest)
	return fmt.Sprintf("%s %s's %s", whose, strings.TrimSuffix(rest, ext), flags[ext])
}

// shellQuote quotes s for a POSIX shell if it needs it, so that the
// printed commands can be pasted whatever the directory is called.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool { return !isNameChar(r) && r != '/' && r != ':' && r != '+' && r != '=' }) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
