package gateway

import (
	"embed"
	"net/http"
)

// dashboardAssets are the dashboard's page, script and style sheet, built
// into the binary so that the dashboard needs nothing from the network: no
// CDN, no fonts, nothing an air-gapped gateway cannot serve.
//
//go:embed dashboard/index.html dashboard/app.js dashboard/style.css
var dashboardAssets embed.FS

// dashboardCSP lets the page load only its own script, style sheet and
// JSON (and its empty data: icon, which spares a request for
// /favicon.ico): even if a value from an agent or caller got into the
// page as markup, no inline script or foreign resource would run.
const dashboardCSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// DashboardHandler returns an HTTP handler that serves a live dashboard of
// the gateway: a page at / that shows the connected agents with their
// tunnels (peer, identity, calls in progress and started, bytes each way)
// and the agents, callers and TLS handshakes recently refused, updated
// every second from the JSON at /api/state (see dashboardState). It is
// what an operator opens to see at a glance who is connected and who is
// being turned away, without a gRPC client for the admin service or a
// Prometheus server.
//
// The page and its assets are embedded in the binary and use relative
// URLs, so the handler also works under a prefix (with http.StripPrefix).
// It shows the same agents as the admin service's ListAgents, with
// their addresses and certificate subjects, and answers anyone who can
// reach it: serve it only where the metrics are served, on an address
// operators alone can reach.
func (g *Gateway) DashboardHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", asset("dashboard/index.html", "text/html; charset=utf-8"))
	mux.HandleFunc("GET /app.js", asset("dashboard/app.js", "text/javascript; charset=utf-8"))
	mux.HandleFunc("GET /style.css", asset("dashboard/style.css", "text/css; charset=utf-8"))
	mux.HandleFunc("GET /api/state", g.serveDashboardState)
	return mux
}

// asset serves the embedded file name as contentType, with the headers
// every response of the dashboard carries.
func asset(name, contentType string) http.HandlerFunc {
	body, err := dashboardAssets.ReadFile(name)
	if err != nil {
		panic("gateway: dashboard asset missing: " + name) // the embed directive lists it
	}
	return func(w http.ResponseWriter, r *http.Request) {
		dashboardHeaders(w, contentType)
		w.Write(body)
	}
}

// dashboardHeaders sets the content type and the security headers of a
// dashboard response. Nothing is cached: the assets are tiny, and a
// gateway upgraded in place then never serves an old script.
func dashboardHeaders(w http.ResponseWriter, contentType string) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Security-Policy", dashboardCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
}
