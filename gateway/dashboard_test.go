package gateway_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fullstorydev/grpchan/grpchantesting"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpctunnel/grpctunnel/gateway"
	"github.com/grpctunnel/grpctunnel/tunnel"
	"github.com/grpctunnel/grpctunnel/tunnelpb"
)

// dashboardState is what the dashboard's page reads from api/state.
type dashboardState struct {
	Now    time.Time `json:"now"`
	Agents []struct {
		Key     string `json:"key"`
		Tunnels []struct {
			Peer           string    `json:"peer"`
			Identity       string    `json:"identity"`
			OpenedAt       time.Time `json:"opened_at"`
			OpenStreams    int64     `json:"open_streams"`
			StreamsStarted uint64    `json:"streams_started"`
			BytesSent      uint64    `json:"bytes_sent"`
			BytesReceived  uint64    `json:"bytes_received"`
			Replica        string    `json:"replica"`
		} `json:"tunnels"`
	} `json:"agents"`
	Replica     string            `json:"replica"`
	Unreachable map[string]string `json:"unreachable_replicas"`
	Refusals    []struct {
		Time   time.Time `json:"time"`
		Who    string    `json:"who"`
		Reason string    `json:"reason"`
		Peer   string    `json:"peer"`
		Key    string    `json:"key"`
		Method string    `json:"method"`
		Error  string    `json:"error"`
	} `json:"refusals"`
}

func getState(t *testing.T, h http.Handler) dashboardState {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/api/state", nil))
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("api/state: %d %q\n%s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
	var st dashboardState
	if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
		t.Fatalf("api/state: %v\n%s", err, rec.Body)
	}
	return st
}

// TestDashboardState: the dashboard's JSON lists the agents with their
// tunnels and counters, and the recent refusals, newest first, bounded in
// number and with what the clients sent quoted and cut.
func TestDashboardState(t *testing.T) {
	opts := gateway.Options{
		AuthorizeAgent: func(_ context.Context, key string) error {
			if key == "intruder" {
				return gateway.Refuse(gateway.ReasonBadToken, status.Error(codes.Unauthenticated, "unknown token"))
			}
			return nil
		},
		AuthorizeCall: func(ctx context.Context, _ string, _ []string) error {
			if len(metadata.ValueFromIncomingContext(ctx, "token")) == 0 {
				return gateway.Refuse(gateway.ReasonNoToken, status.Error(codes.Unauthenticated, "no token"))
			}
			return nil
		},
	}
	g, gw := startGateway(t, opts)
	h := g.DashboardHandler()

	st := getState(t, h)
	if len(st.Agents) != 0 || len(st.Refusals) != 0 || st.Now.IsZero() {
		t.Fatalf("state of an idle gateway: %+v", st)
	}

	startAgent(t, g, gw, startBackend(t), "site-a", 2)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "token", "t")
	if _, err := grpchantesting.NewTestServiceClient(keyed(gw, "site-a")).Unary(ctx, &grpchantesting.Message{Payload: []byte("hello")}); err != nil {
		t.Fatal(err)
	}
	rs := tunnel.NewReverseTunnelServer(tunnelpb.NewTunnelServiceClient(gw))
	if _, err := rs.Serve(metadata.AppendToOutgoingContext(context.Background(), gateway.DefaultKeyHeader, "intruder")); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("intruder's tunnel: %v", err)
	}
	// More caller refusals than the gateway remembers; the last one names
	// a key too long to repeat whole.
	client := grpchantesting.NewTestServiceClient(keyed(gw, "site-a"))
	for range 59 {
		client.Unary(context.Background(), &grpchantesting.Message{})
	}
	long := "<b>" + strings.Repeat("x", 200)
	grpchantesting.NewTestServiceClient(keyed(gw, long)).Unary(context.Background(), &grpchantesting.Message{})

	st = getState(t, h)
	if len(st.Agents) != 1 || st.Agents[0].Key != "site-a" || len(st.Agents[0].Tunnels) != 2 {
		t.Fatalf("agents: %+v", st.Agents)
	}
	var started, sent uint64
	for _, tn := range st.Agents[0].Tunnels {
		if tn.Peer == "" || tn.OpenedAt.IsZero() || tn.OpenedAt.After(st.Now) {
			t.Errorf("tunnel: %+v", tn)
		}
		started += tn.StreamsStarted
		sent += tn.BytesSent
	}
	if started != 1 || sent == 0 {
		t.Errorf("over the tunnels: %d calls started, %d bytes sent; want 1 and more than 0", started, sent)
	}

	if len(st.Refusals) != 50 {
		t.Fatalf("%d refusals remembered, want 50", len(st.Refusals))
	}
	newest := st.Refusals[0]
	if newest.Who != "caller" || newest.Reason != string(gateway.ReasonNoToken) || newest.Peer == "" ||
		newest.Error != `"no token"` || !strings.HasPrefix(newest.Key, `"<b>xxx`) || !strings.HasSuffix(newest.Key, "(203 bytes)") ||
		newest.Method != `"/grpchantesting.TestService/Unary"` {
		t.Errorf("newest refusal: %+v", newest)
	}
	for i, r := range st.Refusals {
		if r.Who != "caller" {
			t.Errorf("refusal %d is of %q: the agent's, the oldest, should have been forgotten", i, r.Who)
		}
		if i > 0 && r.Time.After(st.Refusals[i-1].Time) {
			t.Errorf("refusal %d is newer than the one before it", i)
		}
	}
	if rs := g.RecentRefusals(); len(rs) != 50 || rs[0].Key != newest.Key {
		t.Errorf("RecentRefusals: %d, newest %+v", len(rs), rs[0])
	}
}

// TestDashboardPages: the page and its assets are served with a policy
// that lets them load nothing but themselves, and nothing else is.
func TestDashboardPages(t *testing.T) {
	g, _ := startGateway(t, gateway.Options{})
	h := g.DashboardHandler()
	for _, tc := range []struct {
		method, path string
		code         int
		contentType  string
		body         string
	}{
		{"GET", "/", 200, "text/html; charset=utf-8", `<script src="app.js"`},
		{"HEAD", "/", 200, "text/html; charset=utf-8", ""},
		{"GET", "/app.js", 200, "text/javascript; charset=utf-8", "textContent"},
		{"GET", "/style.css", 200, "text/css; charset=utf-8", "table"},
		{"GET", "/index.html", 404, "", ""},
		{"GET", "/nope", 404, "", ""},
		{"POST", "/api/state", 405, "", ""},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
		if rec.Code != tc.code {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, rec.Code, tc.code)
			continue
		}
		if tc.code != 200 {
			continue
		}
		if got := rec.Header().Get("Content-Type"); got != tc.contentType {
			t.Errorf("%s %s: Content-Type %q, want %q", tc.method, tc.path, got, tc.contentType)
		}
		if csp := rec.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
			t.Errorf("%s %s: Content-Security-Policy %q", tc.method, tc.path, csp)
		}
		if !strings.Contains(rec.Body.String(), tc.body) {
			t.Errorf("%s %s: body lacks %q", tc.method, tc.path, tc.body)
		}
	}
}
