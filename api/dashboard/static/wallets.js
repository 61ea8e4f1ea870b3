/* Meterline dashboard: the Wallets page (needs dashboard.js, loaded before it).
 * - the list comes from the ledger (GET …/wallets: balance, owner email, subject, search, cursor paging);
 * - ?wallet=<id> shows one wallet: balance tiles, grant and adjustment forms, buckets, holds, transactions
 *   (the ledger) and its flow chart (analytics; the page works without it). */
"use strict";

const WALLET_PAGE_SIZE = 25;
const walletState = { q: "", cursor: undefined, txCursor: undefined };

function walletOwner(w) {
  if (w.owner_kind === "user") return w.owner_email || w.owner_ref;
  if (w.owner_kind === "project") return "the project";
  if (w.subject) return w.subject;
  return w.auto_provisioned ? "unknown subject (auto-provisioned)" : w.owner_ref;
}

function walletKind(w) {
  if (w.owner_kind === "subject") return w.auto_provisioned ? "subject · auto" : "subject";
  return w.owner_kind === "user" ? "member" : w.owner_kind;
}

function walletsPath(suffix = "") { return projectPath("/wallets" + suffix); }

async function renderWalletList() {
  const page = await api(walletsPath() + query({ q: walletState.q, cursor: walletState.cursor, limit: WALLET_PAGE_SIZE }));
  table("wallets", [["wallet", w => el("code", {}, w.id)], ["owner / subject", walletOwner], ["kind", walletKind],
    ["balance", w => fmt(w.balance.balance_minor)], ["available", w => fmt(w.balance.available_minor)],
    ["held", w => fmt(w.balance.held_minor)], ["debt", w => fmt(w.balance.debt_minor)],
    ["created (UTC)", w => label(w.created_at).slice(0, 16)]], page.items,
    w => { location.search = "?wallet=" + encodeURIComponent(w.id); },
    walletState.q ? "no wallet matches “" + walletState.q + "”" : "no wallets yet");
  const next = $("wallets-next");
  next.hidden = !page.next_cursor;
  next.onclick = () => { walletState.cursor = page.next_cursor; run(renderWalletList); };
  const first = $("wallets-first");
  first.hidden = !walletState.cursor;
  first.onclick = () => { walletState.cursor = undefined; run(renderWalletList); };
  const w = windowParams();
  try {
    const top = await api(projectPath("/analytics/wallets/top") + query({ from: w.from, to: w.to, limit: 10 }));
    table("top-wallets", [["wallet", r => r.wallet_id], ["spent", r => fmt(r.spent_minor)],
                          ["issued", r => fmt(r.issued_minor)], ["expired", r => fmt(r.expired_minor)],
                          ["utilization", r => pct(r.utilization_rate)]], top.wallets,
          row => { location.search = "?wallet=" + encodeURIComponent(row.wallet_id); });
  } catch (err) {
    table("top-wallets", [["", () => ""]], [], null, "analytics unavailable: " + err.message);
  }
}

function bucketState(b) {
  if (b.expired_at) return "expired";
  if (b.remaining_minor === 0) return "used up";
  return "active";
}

async function renderTransactions(walletId, cursor) {
  const page = await api(walletsPath("/" + encodeURIComponent(walletId) + "/transactions") + query({ limit: 50, cursor }));
  const box = $("wallet-transactions");
  const previous = cursor ? Array.from(box.querySelectorAll("tr")).slice(1) : [];
  table("wallet-transactions", [["id", t => t.id], ["time (UTC)", t => label(t.created_at)], ["kind", t => t.kind],
    ["amount", t => fmt(t.amount_minor)], ["balance after", t => fmt(t.balance_after_minor)],
    ["reason / reference", t => t.reason || t.source_ref || ""],
    ["buckets", t => t.allocations.map(a => (a.bucket_source || "debt") + " " + fmt(a.amount_minor)).join(", ")]],
    page.items, null, "no transactions");
  if (previous.length) box.firstChild.after(...previous);
  const more = $("transactions-more");
  more.hidden = !page.next_cursor;
  more.onclick = () => run(() => renderTransactions(walletId, page.next_cursor));
}

async function renderWalletDetail(walletId) {
  const base = walletsPath("/" + encodeURIComponent(walletId));
  const [wallet, listed, buckets, holds] = await Promise.all([
    api(base), api(walletsPath() + query({ q: walletId, limit: 1 })),
    api(base + "/buckets" + query({ include_empty: true })), api(base + "/reservations" + query({ limit: 100 }))]);
  const entry = listed.items.find(w => w.id === walletId) || wallet;
  $("wallet-owner").textContent = "· " + walletKind(entry) + " · " + walletOwner(entry);
  const b = wallet.balance;
  tiles("wallet-tiles", [["balance", fmt(b.balance_minor), "balance_minor"], ["available", fmt(b.available_minor), "available_minor"],
    ["held", fmt(b.held_minor), "held_minor"], ["floor", fmt(b.floor_minor), "floor_minor"],
    // usage priced but not posted yet (LEDGER_USAGE_SETTLE_INTERVAL_S): already taken off "available"
    ["unsettled usage", fmt(b.unsettled_minor || 0), "unsettled_minor"],
    ["debt", fmt(b.debt_minor), "debt_minor"]]);
  table("wallet-buckets", [["source", x => x.source], ["granted", x => fmt(x.granted_minor)],
    ["remaining", x => fmt(x.remaining_minor)], ["expires (UTC)", x => x.expires_at ? label(x.expires_at) : "never"],
    ["state", bucketState], ["priority", x => x.priority], ["reference", x => x.source_ref || ""],
    ["granted at (UTC)", x => label(x.created_at)]], buckets, null, "no credit buckets");
  table("wallet-holds", [["hold", h => h.id], ["amount", h => fmt(h.amount_minor)], ["status", h => h.status],
    ["expires (UTC)", h => label(h.expires_at)], ["committed as", h => h.committed_transaction_id || ""],
    ["created (UTC)", h => label(h.created_at)]], holds, null, "no reservations");
  await renderTransactions(walletId, undefined);
  const w = windowParams();
  try {
    const flow = await api(projectPath("/analytics/credit-flow") + query({ from: w.from, to: w.to, granularity: w.granularity, wallet_id: walletId }));
    chart("wallet", "chart-wallet", { type: "bar", data: {
      labels: flow.series.map(r => label(r.bucket)),
      datasets: [{ label: "issued", data: flow.series.map(r => r.issued_minor), backgroundColor: COLORS[3] },
                 { label: "spent", data: flow.series.map(r => r.spent_minor), backgroundColor: COLORS[0] },
                 { label: "expired", data: flow.series.map(r => r.expired_minor), backgroundColor: COLORS[1] }] } });
  } catch (err) { /* analytics is optional here: the ledger sections above are the wallet's truth */ }
}

function currentWallet() { return new URLSearchParams(location.search).get("wallet"); }

window.meterlinePages.wallets = {
  setup() {
    const walletId = currentWallet();
    if (!walletId) {
      const search = $("wallet-search");
      search.addEventListener("submit", (event) => {
        event.preventDefault();
        walletState.q = search.elements.q.value.trim();
        walletState.cursor = undefined;
        run(renderWalletList);
      });
      bindForm("wallet-create", async (v) => {
        const created = await post(walletsPath(), v);
        walletState.q = created.id;
        $("wallet-search").elements.q.value = created.id;
      });
      return;
    }
    $("wallet-list").hidden = true;
    $("wallet-detail").hidden = false;
    $("wallet-id").textContent = walletId;
    const money = (path) => async (v, form) => {
      await post(walletsPath("/" + encodeURIComponent(walletId) + path), v,
                 { "Idempotency-Key": form.dataset.idempotencyKey });
    };
    bindForm("grant-form", money("/grants"));
    bindForm("adjust-form", money("/adjustments"));
  },
  render() {
    const walletId = currentWallet();
    return walletId ? renderWalletDetail(walletId) : renderWalletList();
  },
};
