/* Meterline dashboard: the pages that configure a project (needs dashboard.js, loaded before it).
 * Each page is a table of what exists plus a form; every change goes through the same JSON API routes as curl
 * and the SDK (admin role), and is audited there. */
"use strict";

const enc = encodeURIComponent;

// ------------------------------------------------------------------------------------------------- meters

/* A form that creates, or — after a row's Edit — changes the row it was filled from (form.dataset.editing). */
function startEditing(formId, key, caption, fill) {
  const form = $(formId);
  form.dataset.editing = key;
  fill(form);
  form.querySelector("button[type=submit]").textContent = caption;
  form.querySelector(".editing-note").hidden = false;
  form.querySelector(".editing-note span").textContent = key;
  form.scrollIntoView();
}

function stopEditing(formId, caption) {
  const form = $(formId);
  delete form.dataset.editing;
  form.querySelector("button[type=submit]").textContent = caption;
  form.querySelector(".editing-note").hidden = true;
}

function editingNote(formId, caption, reset) {
  const form = $(formId);
  const cancel = el("button", { type: "button" }, "cancel");
  cancel.addEventListener("click", () => { reset(form); stopEditing(formId, caption); });
  form.append(el("p", { className: "editing-note muted", hidden: true }, "Editing ", el("span"), " · ", cancel));
}

window.meterlinePages.meters = {
  setup() {
    editingNote("meter-form", "Create meter", f => { f.reset(); f.elements.slug.readOnly = false; });
    bindForm("meter-form", async (v, f) => {
      if (f.dataset.editing) {
        const { slug, ...changes } = v;
        changes.group_by = changes.group_by || [];
        changes.filters = changes.filters || [];
        await api(projectPath("/meters/" + enc(f.dataset.editing)), { method: "PATCH", body: JSON.stringify(changes) });
        f.elements.slug.readOnly = false;
        stopEditing("meter-form", "Create meter");
      } else {
        await post(projectPath("/meters"), v);
      }
    });
  },
  async render() {
    const meters = await api(projectPath("/meters"));
    const edit = m => startEditing("meter-form", m.slug, "Save as version " + (m.version + 1), f => {
      for (const name of ["slug", "event_type", "aggregation", "value_property", "name"]) f.elements[name].value = m[name] || "";
      f.elements.group_by.value = m.group_by.join(", ");
      f.elements.filters.value = m.filters.length ? JSON.stringify(m.filters) : "";
      f.elements.slug.readOnly = true;
    });
    table("meters", [["slug", m => m.slug], ["event type", m => m.event_type], ["aggregation", m => m.aggregation],
      ["value", m => m.value_property || "(count)"], ["group by", m => m.group_by.join(", ")],
      ["filters", m => m.filters.map(f => JSON.stringify(f).replace(/,"/g, ', "')).join(" and ")], ["version", m => m.version], ["since (UTC)", m => label(m.created_at)],
      ["", m => el("span", {}, el("button", { type: "button", className: "row-action", "data-action": "edit",
                                              onclick: () => edit(m) }, "Edit"),
                   actionButton("Archive", () => api(projectPath("/meters/" + enc(m.slug)), { method: "DELETE" }), "archive"))]],
      meters, null, "no meters yet: events are accepted but nothing is counted or charged");
  },
};

// ------------------------------------------------------------------------------------------------- prices

/* "1000 0" / "inf 0.5 100" lines -> [{up_to, unit_price_minor, flat_price_minor}] */
function parseTiers(text) {
  return text.split("\n").map(l => l.trim()).filter(Boolean).map(line => {
    const [upTo, unit, flat] = line.split(/\s+/);
    const tier = { up_to: /^(inf|∞|-)$/i.test(upTo) ? null : upTo, unit_price_minor: unit || "0" };
    if (flat) tier.flat_price_minor = flat;
    return tier;
  });
}

function priceModel(form) {
  const v = formValues(form);
  const model = { model: v.model };
  if (v.model === "per_unit") model.unit_price_minor = v.unit_price_minor;
  else if (v.model === "package") Object.assign(model, { package_size: v.package_size, package_price_minor: v.package_price_minor });
  else model.tiers = parseTiers(v.tiers || "");
  if (v.free_units) model.free_units = v.free_units;
  return model;
}

function describeModel(m) {
  const free = m.free_units && Number(m.free_units) ? " after " + m.free_units + " free" : "";
  if (m.model === "per_unit") return m.unit_price_minor + " per unit" + free;
  if (m.model === "package") return m.package_price_minor + " per " + m.package_size + " units" + free;
  return m.model + ": " + m.tiers.map(t => "≤" + (t.up_to === null ? "∞" : t.up_to) + " @" + t.unit_price_minor
    + (t.flat_price_minor && Number(t.flat_price_minor) ? " +" + t.flat_price_minor : "")).join(", ") + free;
}

function showModelFields(form) {
  const model = form.elements.model.value;
  for (const lbl of form.querySelectorAll("[data-model]")) lbl.hidden = !lbl.dataset.model.split(" ").includes(model);
}

window.meterlinePages.prices = {
  setup() {
    const form = $("price-form");
    form.elements.model.addEventListener("change", () => showModelFields(form));
    showModelFields(form);
    editingNote("price-form", "Create price", f => { f.elements.meter.disabled = false; });
    bindForm("price-form", async (v, f) => {
      if (f.dataset.editing) {
        await post(projectPath("/prices/" + enc(f.dataset.editing) + "/versions"), { model: priceModel(f), period: v.period });
        f.elements.meter.disabled = false;
        stopEditing("price-form", "Create price");
      } else {
        await post(projectPath("/prices"), { meter: v.meter, model: priceModel(f), period: v.period });
      }
    }, { reset: false });
    $("preview-form").addEventListener("submit", (event) => {
      event.preventDefault();
      change(async () => {
        const units = formValues($("preview-form")).units;
        const r = await post(projectPath("/prices/preview"), { model: priceModel(form), units });
        const out = $("preview-result");
        out.textContent = fmt(units) + " units cost " + fmt(r.amount_minor) + " (exact " + r.exact_minor + ")";
        out.dataset.amountMinor = String(r.amount_minor);
      });
    });
  },
  async render() {
    const [meters, prices] = await Promise.all([api(projectPath("/meters")), api(projectPath("/prices"))]);
    const slugs = new Map(meters.map(m => [m.id, m.slug]));
    const select = $("price-form").elements.meter;
    const chosen = select.value;
    select.replaceChildren(...meters.map(m => new Option(m.slug + " (" + m.event_type + ")", m.slug)));
    if (chosen) select.value = chosen;
    table("prices", [["meter", p => slugs.get(p.meter_id) || p.meter_id], ["price", p => p.id],
      ["current model", p => describeModel(p.versions[p.versions.length - 1].model)],
      ["period", p => p.versions[p.versions.length - 1].period], ["versions", p => p.versions.length],
      ["effective from (UTC)", p => label(p.versions[p.versions.length - 1].effective_from)],
      ["", p => el("span", {}, el("button", { type: "button", className: "row-action", "data-action": "version",
          onclick: () => startEditing("price-form", p.id, "Add version (effective now)", f => {
            f.elements.meter.value = slugs.get(p.meter_id); f.elements.meter.disabled = true; }) }, "New version"),
        actionButton("Archive", () => api(projectPath("/prices/" + enc(p.id)), { method: "DELETE" }), "archive"))]],
      prices, null, meters.length ? "no prices yet: usage is counted but charges nothing" : "create a meter first");
  },
};

// ------------------------------------------------------------------------------------------- feature costs

window.meterlinePages["feature-costs"] = {
  setup() {
    bindForm("feature-form", v => {
      const { feature_key: key, ...body } = v;
      return api(projectPath("/feature-costs/" + enc(key)), { method: "PUT", body: JSON.stringify(body) });
    });
  },
  async render() {
    const costs = await api(projectPath("/feature-costs"));
    table("feature-costs", [["feature", c => c.feature_key], ["cost", c => fmt(c.cost_minor)],
      ["requires plan", c => c.requires_entitlement || "–"], ["description", c => c.description || ""],
      ["updated (UTC)", c => label(c.updated_at)],
      ["", c => actionButton("Remove", () => api(projectPath("/feature-costs/" + enc(c.feature_key)), { method: "DELETE" }), "remove")]],
      costs, null, "no features priced yet");
  },
};

// ------------------------------------------------------------------------------------------ packs & plans

window.meterlinePages.offers = {
  setup() {
    const form = $("offer-form");
    const toggle = () => { for (const l of form.querySelectorAll("[data-kind]")) l.hidden = form.elements.kind.value !== l.dataset.kind; };
    form.elements.kind.addEventListener("change", toggle);
    toggle();
    bindForm("offer-form", (v, f) => {
      const plan = f.elements.kind.value === "plan";
      if (!plan) { delete v.interval; delete v.credits_expire; }
      return post(projectPath(plan ? "/plans" : "/credit-packs"), v);
    });
    form.addEventListener("reset", () => setTimeout(toggle));
  },
  async render() {
    const [packs, plans] = await Promise.all([api(projectPath("/credit-packs")), api(projectPath("/plans"))]);
    const price = o => (o.price_minor / 100).toFixed(2) + " " + o.currency.toUpperCase();
    table("packs", [["slug", o => o.slug], ["name", o => o.name], ["credits", o => fmt(o.credits_minor)], ["price", price],
      ["", o => actionButton("Archive", () => post(projectPath("/credit-packs/" + enc(o.slug) + "/archive")), "archive")]],
      packs, null, "no packs");
    table("plans", [["slug", o => o.slug], ["name", o => o.name], ["credits", o => fmt(o.credits_minor)], ["price", price],
      ["every", o => (o.interval_count > 1 ? o.interval_count + " " : "") + o.interval],
      ["credits at period end", o => o.credits_expire === "never" ? "roll over" : "expire"],
      ["", o => actionButton("Archive", () => post(projectPath("/plans/" + enc(o.slug) + "/archive")), "archive")]],
      plans, null, "no plans");
  },
};

// --------------------------------------------------------------------------------------------- billing

async function renderBilling() {
  const w = windowParams();
  const [rules, runs] = await Promise.all([api(projectPath("/billing-rules")),
                                           api(projectPath("/billing-runs") + query({ limit: 500 }))]);
  const names = new Map(rules.map(r => [r.id, r.name]));
  const inWindow = runs.items.filter(r => r.due_at >= w.from);
  const series = inWindow.map(r => ({ bucket: r.due_at.slice(0, 10), group: r.status, value: 1 }));
  chart("billing", "chart-billing", { type: "bar", data: pivot(series, r => r.value),
    options: { scales: { x: { stacked: true }, y: { stacked: true, ticks: { precision: 0 } } } } });
  const rulePath = r => projectPath("/billing-rules/" + enc(r.id));
  const setStatus = (r, status) => api(rulePath(r), { method: "PATCH", body: JSON.stringify({ status }) });
  table("billing-rules", [["name", r => r.name], ["wallet", r => r.wallet_id], ["schedule (UTC cron)", r => r.cron],
    ["amount", r => fmt(r.amount_minor)], ["if unpaid", r => r.when_insufficient], ["status", r => r.status],
    ["next run", r => r.status === "active" ? label(r.next_run_at) : "–"],
    ["", r => r.status === "archived" ? "" : el("span", {},
      r.status === "active" ? actionButton("Pause", () => setStatus(r, "paused"), "pause")
                            : actionButton("Resume", () => setStatus(r, "active"), "resume"),
      actionButton("Archive", () => api(rulePath(r), { method: "DELETE" }), "archive"))]], rules, null, "no rules");
  table("billing-runs", [["due", r => label(r.due_at)], ["rule", r => names.get(r.rule_id) || r.rule_id],
    ["wallet", r => r.wallet_id], ["status", r => r.status], ["amount", r => fmt(r.amount_minor)],
    ["transaction", r => r.transaction_id], ["detail", r => r.detail]], inWindow.slice(0, 100));
}

/* The schedule field of a billing rule from the two inputs: daily; weekly "mon,fri"; monthly "1,15,last"; cron. */
function schedule(kind, value) {
  const parts = (value || "").split(",").map(s => s.trim()).filter(Boolean);
  if (kind === "cron") return { kind, expression: value };
  if (kind === "weekly") return { kind, days: parts };
  if (kind === "monthly") return { kind, days: parts.map(d => (/^\d+$/.test(d) ? Number(d) : d)) };
  return { kind: "daily" };
}

window.meterlinePages.billing = {
  setup() {
    bindForm("rule-form", (v, f) => post(projectPath("/billing-rules"),
      { ...v, schedule: schedule(f.elements.schedule_kind.value, f.elements.schedule_value.value.trim()) }));
  },
  render: renderBilling,
};

// ------------------------------------------------------------------------------------------------ API keys

window.meterlinePages["api-keys"] = {
  setup() {
    bindForm("key-form", async (v, f) => {
      const days = Number(f.elements.expires_in_days.value || 0);
      const issued = await post(projectPath("/api-keys"), { ...v, ...(days ? { expires_in_s: days * 86400 } : {}) });
      const box = $("key-token");
      box.querySelector("code").textContent = issued.token;
      box.hidden = false;
    });
  },
  async render() {
    const keys = await api(projectPath("/api-keys"));
    table("api-keys", [["name", k => k.name], ["key", k => k.display], ["scopes", k => k.scopes.join(", ")],
      ["status", k => k.status], ["created (UTC)", k => label(k.created_at)],
      ["last used", k => k.last_used_at ? label(k.last_used_at) : "never"],
      ["expires", k => k.expires_at ? label(k.expires_at) : "never"],
      ["", k => k.status !== "active" ? "" : actionButton("Revoke", () => post(projectPath("/api-keys/" + enc(k.id) + "/revoke")), "revoke")]],
      keys, null, "no API keys");
  },
};

// -------------------------------------------------------------------------------------------- subject keys

window.meterlinePages["subject-keys"] = {
  setup() {
    bindForm("subject-key-form", v => api(projectPath("/subject-keys/" + enc(v.subject)),
      { method: "PUT", body: JSON.stringify(v.wallet_id ? { wallet_id: v.wallet_id } : {}) }));
  },
  async render(after) {
    const keys = await api(projectPath("/subject-keys") + query({ limit: 100, after }));
    const box = $("subject-keys");
    const previous = after ? Array.from(box.querySelectorAll("tr")).slice(1) : [];
    table("subject-keys", [["subject", k => k.subject],
      ["wallet", k => el("a", { href: "/dashboard/wallets?wallet=" + enc(k.wallet_id) }, k.wallet_id)],
      ["since (UTC)", k => label(k.created_at)],
      ["", k => actionButton("Remove", () => api(projectPath("/subject-keys/" + enc(k.subject)), { method: "DELETE" }), "remove")]],
      keys, null, "no subject keys: each subject is charged to its own wallet");
    if (previous.length) box.firstChild.after(...previous);
    const more = $("subject-keys-more");
    more.hidden = keys.length < 100;
    more.onclick = () => run(() => window.meterlinePages["subject-keys"].render(keys[keys.length - 1].subject));
  },
};

// ---------------------------------------------------------------------------------- members and invitations

const ROLES = ["admin", "member", "viewer"];

function roleSelect(member) {
  if (member.role === "owner") return "owner";
  const select = el("select", { "data-role-of": member.email }, ...ROLES.map(r => new Option(r, r, false, r === member.role)));
  select.addEventListener("change", () => change(() => api(projectPath("/members/" + enc(member.user_id)),
    { method: "PATCH", body: JSON.stringify({ role: select.value }) })));
  return select;
}

window.meterlinePages.team = {
  setup() {
    const form = bindForm("invite-form", v => post(projectPath("/invitations"), v));
    $("add-member").addEventListener("click", () => {
      if (!form.reportValidity()) return;
      change(async () => { await post(projectPath("/members"), formValues(form)); form.reset(); });
    });
  },
  async render() {
    const [members, invitations] = await Promise.all([api(projectPath("/members")), api(projectPath("/invitations"))]);
    table("members", [["email", m => m.email], ["name", m => m.display_name || ""], ["role", roleSelect],
      ["since (UTC)", m => label(m.created_at)],
      ["", m => m.role === "owner" ? "" : actionButton("Remove", () => api(projectPath("/members/" + enc(m.user_id)), { method: "DELETE" }), "remove")]],
      members);
    const invPath = i => projectPath("/invitations/" + enc(i.id));
    table("invitations", [["email", i => i.email], ["role", i => i.role], ["status", i => i.status],
      ["sent", i => i.send_count + "× · last " + label(i.last_sent_at)], ["expires (UTC)", i => label(i.expires_at)],
      ["", i => i.status !== "pending" ? "" : el("span", {},
        actionButton("Resend", () => post(invPath(i) + "/resend"), "resend"),
        actionButton("Revoke", () => api(invPath(i), { method: "DELETE" }), "revoke"))]],
      invitations, null, "no invitations");
  },
};
