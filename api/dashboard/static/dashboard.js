/* Meterline dashboard: one small script for every page (no build step).
 * - the access token lives in sessionStorage (key "meterline.token"); a 401 sends you to the login page;
 * - the chosen project and window live in sessionStorage too;
 * - every chart is registered in window.meterlineCharts[name] and every finished page sets
 *   document.body.dataset.ready = "1" (the browser tests read both). */
"use strict";

const TOKEN_KEY = "meterline.token";
const PROJECT_KEY = "meterline.project";
const RANGE_KEY = "meterline.range";
const COLORS = ["#2563eb", "#dc2626", "#f59e0b", "#16a34a", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
window.meterlineCharts = {};

function $(id) { return document.getElementById(id); }

function showError(message) {
  const box = $("error");
  if (box) { box.textContent = message; box.hidden = false; }
  document.body.dataset.ready = "error";
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({ "Accept": "application/json" }, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && document.body.dataset.page !== "login") {
    sessionStorage.removeItem(TOKEN_KEY);
    location.href = "/dashboard/login";
    throw new Error("signed out");
  }
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((body && (body.detail || body.title)) || response.statusText);
  return body;
}

function projectPath(suffix) {
  return "/api/v1/projects/" + encodeURIComponent(sessionStorage.getItem(PROJECT_KEY)) + suffix;
}

function windowParams() {
  const days = Number(sessionStorage.getItem(RANGE_KEY) || "30");
  const to = new Date();
  const from = new Date(to.getTime() - days * 86400000);
  const granularity = days <= 2 ? "hour" : "day";
  return { from: from.toISOString(), to: to.toISOString(), granularity, days };
}

function query(params) {
  return "?" + Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => encodeURIComponent(k) + "=" + encodeURIComponent(v)).join("&");
}

function fmt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }
function pct(rate) { return rate === null || rate === undefined ? "–" : (Number(rate) * 100).toFixed(1) + "%"; }
function label(iso) { return iso.replace("T", " ").replace(/:00(\+00:00|Z)$/, "").replace(/\+00:00$/, ""); }

function tiles(id, items) {
  const box = $(id);
  box.replaceChildren(...items.map(([name, value, key]) => {
    const tile = document.createElement("div");
    tile.className = "tile";
    tile.dataset.key = key || name;
    const v = document.createElement("div"); v.className = "value"; v.textContent = value;
    const n = document.createElement("div"); n.className = "name"; n.textContent = name;
    tile.append(v, n);
    return tile;
  }));
}

function table(id, columns, rows, onRow) {
  const el = $(id);
  const head = document.createElement("tr");
  for (const [title] of columns) { const th = document.createElement("th"); th.textContent = title; head.append(th); }
  const body = rows.map(row => {
    const tr = document.createElement("tr");
    for (const [, get] of columns) {
      const td = document.createElement("td");
      const value = get(row);
      td.textContent = value === null || value === undefined ? "" : String(value);
      tr.append(td);
    }
    if (onRow) { tr.classList.add("link"); tr.addEventListener("click", () => onRow(row)); }
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr"); const td = document.createElement("td");
    td.colSpan = columns.length; td.className = "muted"; td.textContent = "nothing in this window";
    tr.append(td); body.push(tr);
  }
  el.replaceChildren(head, ...body);
}

function chart(name, canvasId, config) {
  if (window.meterlineCharts[name]) window.meterlineCharts[name].destroy();
  config.options = Object.assign({ animation: false, responsive: true }, config.options || {});
  window.meterlineCharts[name] = new Chart($(canvasId), config);
  window.meterlineCharts[name].resize();  // size to the card now, not on the next ResizeObserver tick
  return window.meterlineCharts[name];
}

/* Series rows {bucket, group, value} -> Chart.js labels + one dataset per group (missing buckets = 0). */
function pivot(series, valueOf) {
  const labels = [...new Set(series.map(r => r.bucket))].sort();
  const groups = [...new Set(series.map(r => r.group))].sort();
  const index = new Map(labels.map((b, i) => [b, i]));
  const datasets = groups.map((g, i) => {
    const data = new Array(labels.length).fill(0);
    for (const r of series) if (r.group === g) data[index.get(r.bucket)] += valueOf(r);
    return { label: g, data, borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length] };
  });
  return { labels: labels.map(label), datasets };
}

// ----------------------------------------------------------------------------------------------- pages

async function pageLogin() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const body = await api("/api/v1/auth/login", { method: "POST",
        body: JSON.stringify({ email: $("email").value, password: $("password").value }) });
      sessionStorage.setItem(TOKEN_KEY, body.access_token);
      location.href = "/dashboard/usage";
    } catch (err) { showError("Sign-in failed: " + err.message); }
  });
  document.body.dataset.ready = "1";
}

async function pageUsage() {
  const w = windowParams();
  const meter = $("usage-meter").value;
  const [totals, usage, top] = await Promise.all([
    api(projectPath("/analytics/usage/totals") + query({ from: w.from, to: w.to })),
    api(projectPath("/analytics/usage") + query({ from: w.from, to: w.to, granularity: w.granularity, meter })),
    api(projectPath("/analytics/usage/top-consumers") + query({ from: w.from, to: w.to, meter, limit: 10 })),
  ]);
  tiles("usage-totals", totals.meters.map(m => [m.meter, fmt(m.units) + " units · " + fmt(m.events) + " events", m.meter]));
  const select = $("usage-meter");
  if (select.options.length === 1) {
    for (const m of totals.meters) select.add(new Option(m.meter, m.meter));
    select.addEventListener("change", () => run(pageUsage));
  }
  $("usage-granularity").textContent = "per " + usage.granularity;
  chart("usage", "chart-usage", { type: "line", data: pivot(usage.series, r => Number(r.units)),
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "units" } } } } });
  const byUnits = top.meter !== null;
  chart("top", "chart-top", { type: "bar", data: {
    labels: top.consumers.map(c => c.subject),
    datasets: [{ label: byUnits ? "units of " + top.meter : "events (all meters)",
                 data: top.consumers.map(c => Number(byUnits ? c.units : c.events)), backgroundColor: COLORS[0] }] },
    options: { indexAxis: "y" } });
}

async function pageCredits() {
  const w = windowParams();
  const [summary, flow, revenue] = await Promise.all([
    api(projectPath("/analytics/wallets/summary") + query({ from: w.from, to: w.to })),
    api(projectPath("/analytics/credit-flow") + query({ from: w.from, to: w.to, granularity: w.granularity })),
    api(projectPath("/analytics/revenue") + query({ from: w.from, to: w.to })),
  ]);
  tiles("credit-tiles", [
    ["issued", fmt(summary.issued_minor), "issued_minor"], ["spent", fmt(summary.spent_minor), "spent_minor"],
    ["expired", fmt(summary.expired_minor), "expired_minor"],
    ["net movement", fmt(summary.net_movement_minor), "net_movement_minor"],
    ["utilization", pct(summary.utilization_rate), "utilization_rate"],
    ["expiration", pct(summary.expiration_rate), "expiration_rate"],
    ["outstanding now", fmt(summary.outstanding_end_minor), "outstanding_end_minor"]]);
  chart("flow", "chart-flow", { type: "bar", data: {
    labels: flow.series.map(r => label(r.bucket)),
    datasets: [
      { label: "issued", data: flow.series.map(r => r.issued_minor), backgroundColor: COLORS[3] },
      { label: "spent", data: flow.series.map(r => r.spent_minor), backgroundColor: COLORS[0] },
      { label: "expired", data: flow.series.map(r => r.expired_minor), backgroundColor: COLORS[1] }] } });
  chart("sources", "chart-sources", { type: "doughnut", options: { aspectRatio: 2 }, data: {
    labels: summary.sources.map(s => s.source),
    datasets: [{ data: summary.sources.map(s => s.issued_minor), backgroundColor: COLORS }] } });
  table("revenue", [["offer", r => r.offer], ["kind", r => r.kind], ["credits", r => fmt(r.credits_minor)],
                    ["purchases", r => r.purchases], ["wallets", r => r.wallets]], revenue.offers);
}

async function pageWallets() {
  const w = windowParams();
  const walletId = new URLSearchParams(location.search).get("wallet");
  if (!walletId) {
    const top = await api(projectPath("/analytics/wallets/top") + query({ from: w.from, to: w.to, limit: 25 }));
    table("top-wallets", [["wallet", r => r.wallet_id], ["spent", r => fmt(r.spent_minor)],
                          ["issued", r => fmt(r.issued_minor)], ["expired", r => fmt(r.expired_minor)],
                          ["utilization", r => pct(r.utilization_rate)]], top.wallets,
          row => { location.search = "?wallet=" + encodeURIComponent(row.wallet_id); });
    return;
  }
  $("wallet-list").hidden = true;
  $("wallet-detail").hidden = false;
  $("wallet-id").textContent = walletId;
  const [detail, flow] = await Promise.all([
    api(projectPath("/analytics/wallets/" + encodeURIComponent(walletId)) + query({ from: w.from, to: w.to, limit: 100 })),
    api(projectPath("/analytics/credit-flow") + query({ from: w.from, to: w.to, granularity: w.granularity, wallet_id: walletId })),
  ]);
  tiles("wallet-tiles", [["issued", fmt(detail.issued_minor), "issued_minor"], ["spent", fmt(detail.spent_minor), "spent_minor"],
    ["expired", fmt(detail.expired_minor), "expired_minor"], ["balance now", fmt(detail.outstanding_end_minor), "outstanding_end_minor"]]);
  chart("wallet", "chart-wallet", { type: "bar", data: {
    labels: flow.series.map(r => label(r.bucket)),
    datasets: [{ label: "issued", data: flow.series.map(r => r.issued_minor), backgroundColor: COLORS[3] },
               { label: "spent", data: flow.series.map(r => r.spent_minor), backgroundColor: COLORS[0] },
               { label: "expired", data: flow.series.map(r => r.expired_minor), backgroundColor: COLORS[1] }] } });
  table("wallet-transactions", [["id", r => r.transaction_id], ["time", r => label(r.created_at)], ["kind", r => r.kind],
    ["amount", r => fmt(r.amount_minor)], ["balance after", r => fmt(r.balance_after_minor)],
    ["source", r => r.bucket_source || r.source_ref]], detail.transactions);
}

async function pagePaywall() {
  const w = windowParams();
  const funnel = await api(projectPath("/analytics/paywall-funnel") + query({ from: w.from, to: w.to }));
  chart("funnel", "chart-funnel", { type: "bar", data: { labels: funnel.stages.map(s => s.stage),
    datasets: [{ label: "subjects", data: funnel.stages.map(s => s.subjects), backgroundColor: COLORS[4] }] },
    options: { indexAxis: "y" } });
  table("reasons", [["allowed", r => r.allowed ? "yes" : "no"], ["reason", r => r.reason], ["policy", r => r.policy_id],
                    ["decisions", r => r.decisions], ["subjects", r => r.subjects]], funnel.reasons);
}

async function pageAudit(cursor) {
  const page = await api(projectPath("/audit-log") + query({ limit: 50, cursor }));
  const columns = [["time", r => label(r.created_at)], ["action", r => r.action],
    ["actor", r => r.actor_user_id || r.actor_key_id || r.actor_kind], ["target", r => r.target_kind + " " + (r.target_id || "")],
    ["change", r => JSON.stringify({ before: r.before, after: r.after })]];
  const el = $("audit");
  const previous = cursor ? Array.from(el.querySelectorAll("tr")).slice(1) : [];
  table("audit", columns, page.items);
  if (previous.length) el.prepend(...[el.firstChild], ...previous);
  const more = $("audit-more");
  more.hidden = !page.next_cursor;
  more.onclick = () => run(() => pageAudit(page.next_cursor));
}

async function pageBilling() {
  const w = windowParams();
  const [rules, runs] = await Promise.all([api(projectPath("/billing-rules")),
                                           api(projectPath("/billing-runs") + query({ limit: 500 }))]);
  const names = new Map(rules.map(r => [r.id, r.name]));
  const inWindow = runs.items.filter(r => r.due_at >= w.from);
  const series = inWindow.map(r => ({ bucket: r.due_at.slice(0, 10), group: r.status, value: 1 }));
  chart("billing", "chart-billing", { type: "bar", data: pivot(series, r => r.value),
    options: { scales: { x: { stacked: true }, y: { stacked: true, ticks: { precision: 0 } } } } });
  table("billing-rules", [["name", r => r.name], ["wallet", r => r.wallet_id], ["schedule (UTC cron)", r => r.cron],
    ["amount", r => fmt(r.amount_minor)], ["if unpaid", r => r.when_insufficient], ["status", r => r.status],
    ["next run", r => r.status === "active" ? label(r.next_run_at) : "–"]], rules);
  table("billing-runs", [["due", r => label(r.due_at)], ["rule", r => names.get(r.rule_id) || r.rule_id],
    ["wallet", r => r.wallet_id], ["status", r => r.status], ["amount", r => fmt(r.amount_minor)],
    ["transaction", r => r.transaction_id], ["detail", r => r.detail]], inWindow.slice(0, 100));
}

async function pageDeadLetters() {
  const body = await api(projectPath("/analytics/dead-letters") + query({ limit: 100 }));
  table("dead-letters", [["received", r => label(r.received_at)], ["reason", r => r.reason],
    ["partition/offset", r => r.kafka_partition + "/" + r.kafka_offset], ["payload", r => r.payload.slice(0, 300)]],
    body.dead_letters);
}

const PAGES = { usage: pageUsage, credits: pageCredits, wallets: pageWallets, paywall: pagePaywall,
                billing: pageBilling, audit: () => pageAudit(undefined), "dead-letters": pageDeadLetters };

async function run(render) {
  document.body.dataset.ready = "";
  try { await render(); document.body.dataset.ready = "1"; }
  catch (err) { if (err.message !== "signed out") showError(err.message); }
}

async function boot() {
  const page = document.body.dataset.page;
  for (const a of document.querySelectorAll("[data-nav]")) if (a.dataset.nav === page) a.classList.add("active");
  if (page === "login") { document.querySelector("header .controls").hidden = true; return pageLogin(); }
  if (!sessionStorage.getItem(TOKEN_KEY)) { location.href = "/dashboard/login"; return; }
  $("logout").addEventListener("click", () => { sessionStorage.clear(); location.href = "/dashboard/login"; });
  const range = $("range");
  range.value = sessionStorage.getItem(RANGE_KEY) || "30";
  range.addEventListener("change", () => { sessionStorage.setItem(RANGE_KEY, range.value); run(PAGES[page]); });
  let me;
  try { me = await api("/api/v1/auth/me"); } catch (err) { if (err.message !== "signed out") showError(err.message); return; }
  const select = $("project");
  const projects = me.projects || [];
  for (const p of projects) select.add(new Option((p.project_name || p.name) + " (" + p.role + ")", p.project_id || p.id));
  if (!projects.length) { showError("You are not a member of any project yet."); return; }
  const saved = sessionStorage.getItem(PROJECT_KEY);
  const ids = Array.from(select.options).map(o => o.value);
  sessionStorage.setItem(PROJECT_KEY, ids.includes(saved) ? saved : ids[0]);
  select.value = sessionStorage.getItem(PROJECT_KEY);
  select.addEventListener("change", () => { sessionStorage.setItem(PROJECT_KEY, select.value); location.reload(); });
  await run(PAGES[page]);
}

document.addEventListener("DOMContentLoaded", boot);
