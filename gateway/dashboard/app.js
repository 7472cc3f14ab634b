// The gateway's dashboard: polls api/state and redraws the tables.
//
// Polling rather than Server-Sent Events: each poll is an ordinary short
// request, so an open tab holds no connection or goroutine in the gateway,
// the HTTP server's timeouts and graceful shutdown treat it like any other
// request, and any proxy in between passes it. A failed fetch is also the
// plainest sign that the gateway cannot be reached, which the page must
// show. One small JSON document a second is cheap for both sides.
//
// Everything the gateway reports comes from agents and callers, so it is
// only ever put into the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 5000;

let lastOK = null;

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fmtInt(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function fmtBytes(n) {
  n = Number(n || 0);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return (u === 0 ? String(n) : n.toFixed(1)) + " " + units[u];
}

function fmtSince(iso, now) {
  const t = new Date(iso), d = Math.max(0, Math.round((now - t) / 1000));
  const ago = d < 60 ? d + "s" : d < 3600 ? Math.floor(d / 60) + "m" : Math.floor(d / 3600) + "h" + Math.floor((d % 3600) / 60) + "m";
  return t.toLocaleTimeString() + " (" + ago + ")";
}

function renderAgents(agents, now) {
  const body = document.querySelector("#agents tbody");
  const rows = document.createDocumentFragment();
  let tunnels = 0;
  for (const a of agents) {
    a.tunnels.forEach((t, i) => {
      tunnels++;
      const tr = document.createElement("tr");
      tr.className = "tunnel" + (i === 0 ? " first-tunnel" : "");
      tr.dataset.key = a.key;
      cell(tr, i === 0 ? a.key : "", "key");
      cell(tr, t.replica, "replica");
      cell(tr, t.peer);
      cell(tr, t.identity);
      cell(tr, fmtSince(t.opened_at, now));
      cell(tr, fmtInt(t.open_streams), "num");
      cell(tr, fmtInt(t.streams_started), "num");
      cell(tr, fmtBytes(t.bytes_sent), "num");
      cell(tr, fmtBytes(t.bytes_received), "num");
      rows.appendChild(tr);
    });
  }
  body.replaceChildren(rows);
  document.getElementById("no-agents").hidden = agents.length > 0;
  document.getElementById("agent-count").textContent =
    "(" + agents.length + (agents.length === 1 ? " agent, " : " agents, ") + tunnels + (tunnels === 1 ? " tunnel)" : " tunnels)");
}

// renderCluster shows the replica column on a replica of a cluster, and
// names the replicas whose agents are missing because they did not answer.
function renderCluster(st) {
  document.getElementById("agents").classList.toggle("clustered", Boolean(st.replica));
  const p = document.getElementById("unreachable");
  const down = Object.entries(st.unreachable_replicas || {});
  p.hidden = down.length === 0;
  p.textContent = down.length === 0 ? "" :
    "Not listed: the agents of replica " + down.map(([id, why]) => id + " (" + why + ")").join(", replica ") + ", which did not answer.";
}

function renderRefusals(refusals) {
  const body = document.querySelector("#refusals tbody");
  const rows = document.createDocumentFragment();
  for (const r of refusals) {
    const tr = document.createElement("tr");
    cell(tr, new Date(r.time).toLocaleTimeString());
    cell(tr, r.who);
    cell(tr, r.reason);
    cell(tr, r.peer);
    cell(tr, r.identity);
    cell(tr, r.key);
    cell(tr, r.method);
    cell(tr, r.error);
    rows.appendChild(tr);
  }
  body.replaceChildren(rows);
  document.getElementById("no-refusals").hidden = refusals.length > 0;
  document.getElementById("refusal-count").textContent = refusals.length ? "(" + refusals.length + ")" : "";
}

function setStatus(cls, text) {
  const s = document.getElementById("status");
  s.className = "status " + cls;
  s.textContent = text;
  document.body.classList.toggle("stale", cls === "unreachable");
}

async function poll() {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    const resp = await fetch("api/state", { cache: "no-store", signal: ctl.signal });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const st = await resp.json();
    const now = new Date(st.now);
    renderAgents(st.agents, now);
    renderCluster(st);
    renderRefusals(st.refusals);
    lastOK = new Date();
    setStatus("live", "Live, updated " + lastOK.toLocaleTimeString());
  } catch (err) {
    const why = err && err.name === "AbortError" ? "no answer in " + TIMEOUT_MS / 1000 + "s" : String(err && err.message || err);
    setStatus("unreachable", "Cannot reach the gateway (" + why + ")" +
      (lastOK ? "; data below is from " + lastOK.toLocaleTimeString() : ""));
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

poll();
