package gateway_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fullstorydev/grpchan/grpchantesting"

	"github.com/grpctunnel/grpctunnel/gateway"
)

// chromium is the browser the dashboard's test drives: $CHROMIUM, or
// Debian's chromium found on PATH. Without it the test is skipped, unless
// GRPCTUNNEL_REQUIRE_BROWSER=1 (as in CI) makes that a failure.
func chromium(t *testing.T) string {
	t.Helper()
	path := os.Getenv("CHROMIUM")
	if path == "" {
		path = "chromium"
	}
	found, err := exec.LookPath(path)
	if err == nil {
		return found
	}
	if os.Getenv("GRPCTUNNEL_REQUIRE_BROWSER") == "1" {
		t.Fatalf("GRPCTUNNEL_REQUIRE_BROWSER=1 but no browser: %v (set CHROMIUM to its path)", err)
	}
	t.Skipf("no browser for the dashboard's test (%v); set CHROMIUM, or GRPCTUNNEL_REQUIRE_BROWSER=1 to fail instead", err)
	return ""
}

// startBrowser starts a headless Chromium for the test, returns the context
// to drive its tab with, and stops it, waiting for its process and
// goroutines, when the test ends. The flags keep it off the network:
// without them it tries to reach Google's services and, on a machine with
// no network, hangs on those connections.
func startBrowser(t *testing.T) context.Context {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium(t)),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Headless,
		chromedp.NoSandbox, // containers and CI runners often forbid its sandbox
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.WindowSize(1280, 800),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx, chromedp.WithErrorf(t.Logf))
	t.Cleanup(func() {
		// Close the browser, waiting at most a while for it to go, then
		// end the allocator, which kills what is left and waits for it.
		cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
		defer ccancel()
		if err := chromedp.Cancel(cctx); err != nil {
			t.Logf("closing the browser: %v", err)
		}
		cancel()
		cancelAlloc()
	})
	// Start it now, so that its failure to start is reported as such.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting %s: %v", chromium(t), err)
	}
	return ctx
}

// jsErrors records the page's uncaught exceptions, console.error calls and
// error entries of the browser's log.
type jsErrors struct {
	mu   sync.Mutex
	errs []string
}

func (j *jsErrors) listen(t *testing.T, ctx context.Context) {
	t.Helper()
	err := chromedp.Listen(ctx, func(ev any) {
		var msg string
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			msg = "exception: " + ev.ExceptionDetails.Text
			if ex := ev.ExceptionDetails.Exception; ex != nil {
				msg += " " + ex.Description
			}
		case *runtime.EventConsoleAPICalled:
			if ev.Type != runtime.ConsoleAPICalledTypeError {
				return
			}
			var args []string
			for _, a := range ev.Args {
				args = append(args, string(a.Value)+a.Description)
			}
			msg = "console.error: " + strings.Join(args, " ")
		case *log.EventEntryAdded:
			if ev.Entry.Level != log.EntryLevelError {
				return
			}
			msg = fmt.Sprintf("log (%s): %s %s", ev.Entry.Source, ev.Entry.Text, ev.Entry.URL)
		default:
			return
		}
		j.mu.Lock()
		j.errs = append(j.errs, msg)
		j.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
}

func (j *jsErrors) get() []string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]string(nil), j.errs...)
}

// agentKeysJS lists the agent keys the page shows.
const agentKeysJS = `[...document.querySelectorAll("#agents tbody tr.first-tunnel td.key")].map(td => td.textContent)`

// waitPage polls the page until the JavaScript expression cond holds, and
// fails the test with what the page shows otherwise.
func waitPage(t *testing.T, ctx context.Context, what, cond string) {
	t.Helper()
	_, err := chromedp.Run(ctx, chromedp.Poll[bool](cond,
		chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(15*time.Second)))
	if err != nil {
		keys, _ := chromedp.Run(ctx, chromedp.Evaluate[[]string](agentKeysJS))
		st, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById("status").textContent`))
		t.Fatalf("%s: %v; the page shows agents %q, status %q", what, err, keys, st)
	}
}

// screenshot saves the page to the test's artifact directory.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Errorf("screenshot: %v", err)
		return
	}
	path := filepath.Join(t.ArtifactDir(), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Error(err)
		return
	}
	t.Logf("screenshot: %s", path)
}

// TestDashboardInBrowser loads the dashboard in a real browser: it lists
// both agents, one with a key that is markup, as text; it drops the agent
// that stops, without a reload; it shows a refused caller; it says so when
// the gateway cannot be reached; and its script raises no error.
func TestDashboardInBrowser(t *testing.T) {
	ctx := startBrowser(t)

	g, gw := startGateway(t, gateway.Options{
		AuthorizeCall: func(ctx context.Context, _ string, _ []string) error {
			if len(metadata.ValueFromIncomingContext(ctx, "token")) == 0 {
				return gateway.Refuse(gateway.ReasonNoToken, status.Error(codes.Unauthenticated, "no token"))
			}
			return nil
		},
	})
	// A key that would run a script if the page put it in as markup.
	const markup = `<img src=x onerror="document.title='pwned'">edge-b`
	siteA, _, _ := runAgent(t, g, gw, "site-a", 2)
	runAgent(t, g, gw, markup, 1)
	grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(context.Background(), &grpchantesting.Message{})
	srv := httptest.NewServer(g.DashboardHandler())
	t.Cleanup(srv.Close)

	var errs jsErrors
	errs.listen(t, ctx)
	if err := chromedp.Do(ctx, chromedp.Navigate(srv.URL+"/"), chromedp.WaitVisible("#agents")); err != nil {
		t.Fatal(err)
	}

	waitPage(t, ctx, "both agents listed", fmt.Sprintf(`(() => {
		const keys = %s;
		return keys.length === 2 && keys[0] === %q && keys[1] === "site-a" &&
			document.querySelectorAll("#agents tbody tr").length === 3;
	})()`, agentKeysJS, markup))
	waitPage(t, ctx, "refused caller listed", `[...document.querySelectorAll("#refusals tbody tr")].some(tr => tr.textContent.includes("no_token"))`)
	waitPage(t, ctx, "status live", `document.getElementById("status").classList.contains("live")`)
	if n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("img").length`)); err != nil || n != 0 {
		t.Errorf("the agent's key became markup: %d img elements (%v)", n, err)
	}
	// A gateway alone has no replica column.
	waitPage(t, ctx, "no replica column", `getComputedStyle(document.querySelector("#agents th.replica")).display === "none"`)
	screenshot(t, ctx, "dashboard.png")

	siteA.Stop()
	waitFor(t, func() bool { return tunnelsOf(g, "site-a") == 0 })
	waitPage(t, ctx, "stopped agent dropped", fmt.Sprintf(`(() => {
		const keys = %s;
		return keys.length === 1 && keys[0] === %q;
	})()`, agentKeysJS, markup))

	if title, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.title`)); err != nil || title != "grpctunnel gateway" {
		t.Errorf("title %q (%v)", title, err)
	}
	if e := errs.get(); len(e) > 0 {
		t.Errorf("JavaScript errors:\n%s", strings.Join(e, "\n"))
	}

	// The gateway's HTTP server goes away: the page says so. (The browser
	// logs the failed fetches as errors; that is expected from here on.)
	srv.Close()
	waitPage(t, ctx, "unreachable shown", `(() => {
		const s = document.getElementById("status");
		return s.classList.contains("unreachable") && s.textContent.startsWith("Cannot reach the gateway");
	})()`)
	screenshot(t, ctx, "dashboard-unreachable.png")
}

// TestDashboardOfAReplicaInBrowser: a replica's dashboard lists the agents
// of the whole cluster with the replica holding each tunnel, and names a
// replica that does not answer.
func TestDashboardOfAReplicaInBrowser(t *testing.T) {
	ctx := startBrowser(t)
	r1 := startReplica(t, "gw-1", gateway.Options{})
	r2 := startReplica(t, "gw-2", gateway.Options{})
	backend := startBackend(t)
	startAgent(t, r1.g, r1.callers, backend, "site-a", 1)
	startAgent(t, r2.g, r2.callers, backend, "site-b", 1)
	r1.cluster.set("site-b", r2.peer)
	r1.cluster.set("site-c", gateway.Peer{ID: "gw-down", Conn: downConn(t)})
	srv := httptest.NewServer(r1.g.DashboardHandler())
	t.Cleanup(srv.Close)

	var errs jsErrors
	errs.listen(t, ctx)
	if err := chromedp.Do(ctx, chromedp.Navigate(srv.URL+"/"), chromedp.WaitVisible("#agents")); err != nil {
		t.Fatal(err)
	}
	waitPage(t, ctx, "both replicas' agents, each with its replica", `(() => {
		const rows = [...document.querySelectorAll("#agents tbody tr")].map(tr =>
			tr.querySelector("td.key").textContent + "@" + tr.querySelector("td.replica").textContent);
		return rows.join(" ") === "site-a@gw-1 site-b@gw-2" &&
			getComputedStyle(document.querySelector("#agents th.replica")).display !== "none";
	})()`)
	waitPage(t, ctx, "the silent replica named", `(() => {
		const p = document.getElementById("unreachable");
		return !p.hidden && p.textContent.includes("gw-down");
	})()`)
	screenshot(t, ctx, "dashboard-replica.png")
	if e := errs.get(); len(e) > 0 {
		t.Errorf("the page's script failed: %q", e)
	}
}
