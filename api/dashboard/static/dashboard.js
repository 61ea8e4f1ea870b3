/* Meterline dashboard: one small script for every page (no build step).
 * - the access token lives in sessionStorage (key "meterline.token"); a 401 sends you to the login page;
 * - the chosen project and window live in sessionStorage too;
 * - every chart is registered in window.meterlineCharts[name] and every finished page sets
 *   document.body.dataset.ready = "1" (the browser tests read both); a form submission sets it to "" and back
 *   to "1" once the change is saved and the page re-rendered ("error" when the API refused it);
 * - pages live in window.meterlinePages[slug]: a render function, or {setup, render} when the page has forms
 *   (setup binds them once; render runs on load and after every change). wallets.js and manage.js add theirs.
 * - nothing from the API is ever parsed as HTML: text goes through textContent (the CSP forbids inline script). */
"use strict";

const TOKEN_KEY = "meterline.token";
const PROJECT_KEY = "meterline.project";
const RANGE_KEY = "meterline.range";
const COLORS = ["#2563eb", "#dc2626", "#f59e0b", "#16a34a", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
window.meterlineCharts = {};
window.meterlinePages = window.meterlinePages || {};

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
  if (!response.ok) throw new Error(problemText(body) || response.statusText);
  return body;
}

/* A problem+json body in words: its detail, then each invalid field ("body.slug: String should match …"). */
function problemText(body) {
  if (!body) return "";
  const fields = (body.errors || []).map(e => (e.loc || []).filter(p => p !== "body").join(".") + ": " + e.msg);
  return fields.length ? fields.join("; ") : (body.detail || body.title || "");
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
function label(iso) {
  return iso.replace("T", " ").replace(/\.\d+(?=(\+00:00|Z)?$)/, "").replace(/:00(\+00:00|Z)$/, "").replace(/(\+00:00|Z)$/, "");
}

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

function table(id, columns, rows, onRow, empty = "nothing in this window") {
  const el = $(id);
  const head = document.createElement("tr");
  for (const [title] of columns) { const th = document.createElement("th"); th.textContent = title; head.append(th); }
  const body = rows.map(row => {
    const tr = document.createElement("tr");
    for (const [, get] of columns) {
      const td = document.createElement("td");
      const value = get(row);
      if (value instanceof Node) td.append(value);
      else td.textContent = value === null || value === undefined ? "" : String(value);
      tr.append(td);
    }
    if (onRow) { tr.classList.add("link"); tr.addEventListener("click", () => onRow(row)); }
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr"); const td = document.createElement("td");
    td.colSpan = columns.length; td.className = "muted"; td.textContent = empty;
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

/* el("a", {href: "/x", className: "y"}, "text", node): a DOM node; strings become text nodes, never HTML. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  node.append(...children.filter(c => c !== null && c !== undefined).map(c => c instanceof Node ? c : String(c)));
  return node;
}

/* A button in a table row that runs a change (then re-renders the page like a form does). */
function actionButton(text, action, name) {
  const b = el("button", { type: "button", className: "row-action" }, text);
  if (name) b.dataset.action = name;
  b.addEventListener("click", (event) => { event.stopPropagation(); change(action); });
  return b;
}

/* A fresh Idempotency-Key (crypto.randomUUID needs a secure context; getRandomValues does not). */
function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "dash-" + Array.from(bytes, b => b.toString(16).padStart(2, "0")).join("");
}

/* A form's named fields as a JSON body. data-type: int, list (comma-separated), datetime (datetime-local read
 * as UTC); data-skip: not sent; empty fields are left out (the API's default applies); checkboxes sharing a
 * name become a list of the checked values; data-type json is parsed (a syntax error names the field). */
function formValues(form) {
  const out = {};
  for (const field of form.elements) {
    if (!field.name || field.dataset.skip) continue;
    if (field.type === "checkbox") {
      out[field.name] = out[field.name] || [];
      if (field.checked) out[field.name].push(field.value);
      continue;
    }
    const raw = field.value.trim();
    if (raw === "") continue;
    const type = field.dataset.type;
    if (type === "int") out[field.name] = Number.parseInt(raw, 10);
    else if (type === "list") out[field.name] = raw.split(",").map(v => v.trim()).filter(Boolean);
    else if (type === "datetime") out[field.name] = new Date(raw + "Z").toISOString();
    else if (type === "json") {
      try { out[field.name] = JSON.parse(raw); } catch (err) { throw new Error(field.name + ": not valid JSON (" + err.message + ")"); }
    }
    else out[field.name] = raw;
  }
  return out;
}

let renderCurrent = async () => {};

/* Run a change (a form submission, a row button), then re-render the page. The error box says why a change
 * was refused (the API's problem+json detail). */
async function change(action) {
  document.body.dataset.ready = "";
  $("error").hidden = true;
  try {
    await action();
    await renderCurrent();
    document.body.dataset.ready = "1";
  } catch (err) { if (err.message !== "signed out") showError(err.message); }
}

/* Bind a form: submit(values, form) saves; the form is reset after a success. A form that moves money keeps
 * one Idempotency-Key (form.dataset.idempotencyKey) until it succeeds, so a retry after a lost answer cannot
 * post twice. */
function bindForm(id, submit, { reset = true } = {}) {
  const form = $(id);
  form.dataset.idempotencyKey = newIdempotencyKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    change(async () => {
      await submit(formValues(form), form);
      if (reset) form.reset();
      form.dataset.idempotencyKey = newIdempotencyKey();
    });
  });
  return form;
}

function post(path, body, headers) {
  return api(path, { method: "POST", body: JSON.stringify(body || {}), headers });
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

async function pageSignup() {
  const form = $("signup-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    document.body.dataset.ready = "";
    const v = formValues(form);
    try {
      const body = await post("/api/v1/auth/signup", { email: v.email, password: v.password,
                                                       display_name: v.display_name });
      sessionStorage.setItem(TOKEN_KEY, body.access_token);
      const project = await post("/api/v1/projects", { name: v.project });
      sessionStorage.setItem(PROJECT_KEY, project.id);
      location.href = "/dashboard/wallets";
    } catch (err) {
      showError("Sign-up failed: " + err.message);
      if (/already|exists|taken/i.test(err.message)) $("error").append(" ", el("a", { href: "/dashboard/login" }, "Sign in instead"));
    }
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

async function pagePaywall() {
  const w = windowParams();
  const funnel = await api(projectPath("/analytics/paywall-funnel") + query({ from: w.from, to: w.to }));
  chart("funnel", "chart-funnel", { type: "bar", data: { labels: funnel.stages.map(s => s.stage),
    datasets: [{ label: "subjects", data: funnel.stages.map(s => s.subjects), backgroundColor: COLORS[4] }] },
    options: { indexAxis: "y" } });
  table("reasons", [["allowed", r => r.allowed ? "yes" : "no"], ["reason", r => r.reason], ["policy", r => r.policy_id],
                    ["decisions", r => r.decisions], ["subjects", r => r.subjects]], funnel.reasons);
  const decided = funnel.reasons.some(r => Number(r.decisions) > 0);
  $("paywall-note").textContent = decided
    ? "Access decisions of the window (POST …/access/check), by subject: a subject counts once per stage."
    : "No access decisions in this window yet: they appear once your product calls POST …/access/check.";
}

/* The change an audit entry records, as lines "key: before → after" (only what changed; a create lists what
 * was set, a delete what was there). Nested values are shown as compact JSON. */
function auditDiff(before, after) {
  const show = v => v === null || v === undefined ? "∅" : typeof v === "object" ? JSON.stringify(v) : String(v);
  const isObj = v => v && typeof v === "object" && !Array.isArray(v);
  if (!isObj(before) && !isObj(after)) {
    if (before === null && after === null) return el("span", { className: "muted" }, "–");
    return el("div", {}, el("span", { className: "removed" }, show(before)), " → ", el("span", { className: "added" }, show(after)));
  }
  const b = isObj(before) ? before : {}, a = isObj(after) ? after : {};
  const keys = [...new Set([...Object.keys(b), ...Object.keys(a)])].sort();
  const lines = keys.filter(k => JSON.stringify(b[k]) !== JSON.stringify(a[k])).map(k => {
    const line = el("div", { className: "diff-line" }, el("span", { className: "diff-key" }, k + ": "));
    if (k in b && b[k] !== null) line.append(el("span", { className: "removed" }, show(b[k])));
    if (k in b && b[k] !== null && k in a) line.append(" → ");
    if (k in a) line.append(el("span", { className: "added" }, show(a[k])));
    return line;
  });
  return lines.length ? el("div", { className: "diff" }, ...lines) : el("span", { className: "muted" }, "no change");
}

function auditFilter() {
  const v = formValues($("audit-filter"));
  const day = 86400000;
  return { actor_email: v.actor_email, action: v.action,
           since: v.since ? new Date(v.since + "T00:00:00Z").toISOString() : undefined,
           until: v.until ? new Date(Date.parse(v.until + "T00:00:00Z") + day).toISOString() : undefined };
}

async function renderAudit(cursor) {
  const page = await api(projectPath("/audit-log") + query({ limit: 50, cursor, ...auditFilter() }));
  const columns = [["time (UTC)", r => label(r.created_at)], ["action", r => r.action],
    ["actor", r => r.actor_email || (r.actor_key_id ? "API key " + r.actor_key_id : r.actor_kind)],
    ["target", r => r.target_email ? r.target_kind + " " + r.target_email : r.target_kind + " " + (r.target_id || "")],
    ["change", r => auditDiff(r.before, r.after)]];
  const el_ = $("audit");
  const previous = cursor ? Array.from(el_.querySelectorAll("tr")).slice(1) : [];
  table("audit", columns, page.items, null, "no entries match");
  if (previous.length) el_.firstChild.after(...previous);
  const actions = $("audit-actions");
  const known = new Set(Array.from(actions.options, o => o.value));
  for (const item of page.items) if (!known.has(item.action)) { known.add(item.action); actions.append(el("option", { value: item.action })); }
  const more = $("audit-more");
  more.hidden = !page.next_cursor;
  more.onclick = () => run(() => renderAudit(page.next_cursor));
}

const auditPage = {
  async setup() {
    const members = await api(projectPath("/members"));
    const select = $("audit-filter").elements.actor_email;
    for (const m of members) select.add(new Option(m.email, m.email));
    $("audit-filter").addEventListener("submit", (event) => { event.preventDefault(); run(() => renderAudit(undefined)); });
  },
  render: () => renderAudit(undefined),
};

async function pageDeadLetters() {
  const body = await api(projectPath("/analytics/dead-letters") + query({ limit: 100 }));
  table("dead-letters", [["received", r => label(r.received_at)], ["reason", r => r.reason],
    ["partition/offset", r => r.kafka_partition + "/" + r.kafka_offset], ["payload", r => r.payload.slice(0, 300)]],
    body.dead_letters);
}

/* The latest reconciliation of the four usage records (GET …/reconciliation): what each record was compared up
 * to, the drift per wallet and every mismatched key with the records that disagree (data-state on the tiles:
 * "ok", "drift" or "not-compared"). */
const RECORDS = [["usage_log", "Usage log"], ["ledger", "Ledger"], ["clickhouse_usage", "ClickHouse usage"],
                 ["clickhouse_flow", "ClickHouse credit flow"]];

async function pageReconciliation() {
  const { report } = await api(projectPath("/reconciliation"));
  if (!report) {
    $("recon-summary").textContent = "No reconciliation has finished yet (the scheduler runs one every hour).";
    tiles("recon-records", []);
    table("recon-wallets", [["wallet", r => r.wallet_id]], [], null, "no report yet");
    table("recon-mismatches", [["wallet", r => r.wallet_id]], [], null, "no report yet");
    return;
  }
  const wrong = new Set(report.mismatches.flatMap(m => m.disagreeing));
  $("recon-summary").textContent = "Report " + report.id + ", finished " + label(report.finished_at) + " UTC: " +
    (report.mismatches.length ? report.drift_wallets.length + " wallet(s) drift." : "all compared records agree.");
  tiles("recon-records", RECORDS.map(([key, name]) => {
    const cover = report.coverage[key] || { compared: report.records_compared.includes(key) };
    return [name, !cover.compared ? "not compared" : wrong.has(key) ? "disagrees" : "agrees", key];
  }));
  for (const tile of $("recon-records").children) {
    const cover = report.coverage[tile.dataset.key] || { compared: report.records_compared.includes(tile.dataset.key) };
    tile.dataset.state = !cover.compared ? "not-compared" : wrong.has(tile.dataset.key) ? "drift" : "ok";
    if (cover.why) tile.title = cover.why;
  }
  table("recon-wallets", [["wallet", r => r.wallet_id], ["disagreeing", r => r.disagreeing.join(", ")],
    ["keys", r => r.keys], ["drift (minor units)", r => fmt(r.amount_minor)]], report.drift_wallets, null,
    "no drift: every compared record agrees");
  const show = v => v === null || v === undefined ? "–" : String(v);
  table("recon-mismatches", [["wallet", r => r.wallet_id], ["meter", r => r.meter_id],
    ["period", r => label(r.period_start)], ["measure", r => r.measure],
    ["disagreeing", r => el("span", { className: "removed" }, r.disagreeing.join(", ") + " disagrees")],
    ["values", r => Object.entries(r.values).map(([k, v]) => k + " " + show(v)).join(" · ")],
    ["cut", r => r.cut]], report.mismatches, null, "no mismatched keys");
}

Object.assign(window.meterlinePages, { usage: pageUsage, credits: pageCredits, paywall: pagePaywall,
                                      audit: auditPage, "dead-letters": pageDeadLetters,
                                      reconciliation: pageReconciliation });

async function run(render) {
  document.body.dataset.ready = "";
  try { await render(); document.body.dataset.ready = "1"; }
  catch (err) { if (err.message !== "signed out") showError(err.message); }
}

async function boot() {
  const page = document.body.dataset.page;
  for (const a of document.querySelectorAll("[data-nav]")) if (a.dataset.nav === page) a.classList.add("active");
  if (page === "login") return pageLogin();
  if (page === "signup") return pageSignup();
  if (!sessionStorage.getItem(TOKEN_KEY)) { location.href = "/dashboard/login"; return; }
  $("logout").addEventListener("click", () => { sessionStorage.clear(); location.href = "/dashboard/login"; });
  const range = $("range");
  range.value = sessionStorage.getItem(RANGE_KEY) || "30";
  let me;
  try { me = await api("/api/v1/auth/me"); } catch (err) { if (err.message !== "signed out") showError(err.message); return; }
  $("nav").hidden = false;
  $("controls").hidden = false;
  const select = $("project");
  const projects = me.projects || [];
  for (const p of projects) select.add(new Option((p.project_name || p.name) + " (" + p.role + ")", p.project_id || p.id));
  if (!projects.length) { showError("You are not a member of any project yet."); return; }
  const saved = sessionStorage.getItem(PROJECT_KEY);
  const ids = Array.from(select.options).map(o => o.value);
  sessionStorage.setItem(PROJECT_KEY, ids.includes(saved) ? saved : ids[0]);
  select.value = sessionStorage.getItem(PROJECT_KEY);
  const current = projects.find(p => (p.project_id || p.id) === select.value);
  document.body.dataset.role = current ? current.role : "";
  select.addEventListener("change", () => { sessionStorage.setItem(PROJECT_KEY, select.value); location.reload(); });
  const entry = window.meterlinePages[page];
  const render = typeof entry === "function" ? entry : entry.render;
  renderCurrent = render;
  range.addEventListener("change", () => { sessionStorage.setItem(RANGE_KEY, range.value); run(render); });
  await run(async () => { if (entry.setup) await entry.setup(); await render(); });
}

document.addEventListener("DOMContentLoaded", boot);
