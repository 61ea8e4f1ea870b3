"""The dashboard as a workplace, in headless Chromium against a real api process: sign up, find wallets, move
money with a reason, configure the project on every management page — each step is driven through the page
(fill, click, submit) and then checked against the JSON API, never against the page alone. Screenshots of every
page go to test-artifacts/workplace-*.png."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from dashboard_testkit import ARTIFACTS, PASSWORD, open_page

from ledger.checkpoints import _ENSURE_WALLETS
from ledger.db import make_engine
from ledger.kafka import make_producer
from ledger.outbox import OutboxRelay
from streams.catalog_model import auto_wallet_id
from streams.contracts import TOPIC_USAGE_EVENTS

pytestmark = [pytest.mark.browser, pytest.mark.integration]


class Page:
    """The browser plus the signed-in user's view of the API (to check what a page changed)."""

    def __init__(self, browser: Any, api_url: str) -> None:
        self.browser = browser
        self.url = api_url
        self.project = ""
        self.headers: dict[str, str] = {}

    def open(self, slug: str) -> None:
        open_page(self.browser, f"{self.url}/dashboard/{slug}")

    def js(self, expression: str) -> Any:
        return self.browser.evaluate(expression)

    def fill(self, form: str, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.js(f"(() => {{ const f = document.getElementById({form!r}).elements[{name!r}]; "
                    f"f.value = {json.dumps(value)}; f.dispatchEvent(new Event('change')); return true; }})()")

    def submit(self, form: str) -> None:
        """Submit like a user (the form's own submit button), then wait for the save and the re-render."""
        self.js(f"document.getElementById({form!r}).querySelector('button[type=submit]').click(); true")
        self.settle()

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({selector!r}).click(); true")
        self.settle()

    def click_row_action(self, table: str, first_cell: str, action: str) -> None:
        """Click a row's button (e.g. Archive) in the row whose first cell reads ``first_cell``."""
        self.js(f"[...document.querySelectorAll('#{table} tr')].find(r => r.cells[0].textContent === "
                f"{json.dumps(first_cell)}).querySelector('[data-action={action}]').click(); true")
        self.settle()

    def settle(self) -> None:
        state = self.browser.wait("document.body.dataset.ready")
        assert state == "1", self.js("document.getElementById('error').textContent")

    def cells(self, table: str, column: int) -> list[str]:
        return self.js(f"[...document.querySelectorAll('#{table} tr')].slice(1)"  # type: ignore[no-any-return]
                       f".map(r => r.cells[{column}] ? r.cells[{column}].textContent : '')")

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/projects/{self.project}{path}", params=params, headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: Any, **headers: str) -> Any:
        r = httpx.post(f"{self.url}/api/v1/projects/{self.project}{path}", json=body,
                       headers={**self.headers, **headers})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def shot(self, name: str) -> None:
        self.browser.screenshot(ARTIFACTS / f"workplace-{name}.png")


def _sign_up(page: Page) -> str:
    page.open("wallets")  # signed out: the login page, with no navigation, links to sign-up
    assert page.js("location.pathname") == "/dashboard/login"
    assert page.js("document.getElementById('nav').hidden && document.getElementById('controls').hidden")
    page.js("document.getElementById('to-signup').click(); true")
    page.browser.wait("location.pathname === '/dashboard/signup' && document.body.dataset.ready === '1'")
    assert page.js("document.getElementById('nav').hidden")
    email = f"founder-{uuid.uuid4().hex[:8]}@example.com"
    page.fill("signup-form", {"email": email, "password": PASSWORD, "display_name": "Founder",
                              "project": "Workplace Co"})
    page.shot("signup")
    page.js("document.querySelector('#signup-form button[type=submit]').click(); true")
    page.browser.wait("location.pathname === '/dashboard/wallets' && document.body.dataset.ready === '1'")
    assert page.js("!document.getElementById('nav').hidden")
    login = httpx.post(f"{page.url}/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    page.headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    me = httpx.get(f"{page.url}/api/v1/auth/me", headers=page.headers).json()
    assert [(p["role"]) for p in me["projects"]] == ["owner"]
    page.project = page.js("sessionStorage.getItem('meterline.project')")
    assert page.project == (me["projects"][0].get("project_id") or me["projects"][0].get("id"))
    return email


def _wait_subject_in_analytics(page: Page, subject: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        totals = page.get("/analytics/usage/top-consumers", limit=100)
        if subject in {c["subject"] for c in totals["consumers"]}:
            return
        time.sleep(0.3)
    raise AssertionError("the api's sink did not store the usage event")


def _relay_outbox(database_url: str, topics: Any) -> None:
    """What the ledger process does: publish the outbox (transactions, access decisions) to the broker."""
    engine = make_engine(database_url, pool_size=1)
    producer = make_producer(topics.bootstrap)
    try:
        OutboxRelay(engine=engine, producer=producer, topic_prefix=topics.prefix).drain(timeout_s=30)
    finally:
        engine.dispose()


def test_dashboard_workplace(api_url, topics, browser, stack_env):
    database_url = stack_env["DATABASE_URL"]
    page = Page(browser, api_url)
    owner_email = _sign_up(page)
    page.shot("wallets-empty")

    # --- wallets: who they are for, balance, search, paging ------------------------------------------------
    colleague = httpx.post(f"{api_url}/api/v1/auth/signup", json={
        "email": f"colleague-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD}).json()["user"]
    page.post("/members", {"user_id": colleague["id"], "role": "member"})  # by email it would be an invitation (202)
    member_wallet = page.post("/wallets", {"owner_kind": "user", "owner_ref": colleague["id"]})["id"]
    customer = page.post("/wallets", {"owner_kind": "subject", "owner_ref": "customer-882"})["id"]
    page.post(f"/wallets/{customer}/grants", {"amount_minor": 40}, **{"Idempotency-Key": "seed-1"})
    for n in range(26):
        page.post("/wallets", {"owner_kind": "subject", "owner_ref": f"bulk-{n:02d}"})
    # an auto-provisioned wallet (the ledger knows only its id) whose subject sent usage
    auto = auto_wallet_id(page.project, "ada-from-usage")
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(_ENSURE_WALLETS, {"rows": json.dumps([{"id": auto, "project_id": page.project}])})
    finally:
        engine.dispose()
    producer = make_producer(topics.bootstrap)
    producer.produce(topics.name(TOPIC_USAGE_EVENTS), key=b"ada-from-usage", value=orjson.dumps({
        "specversion": "1.0", "id": uuid.uuid4().hex, "source": "workplace-test", "type": "llm.tokens",
        "subject": "ada-from-usage", "project": page.project, "time": datetime.now(UTC).isoformat(),
        "data": {"tokens": 12}}))
    assert producer.flush(30) == 0
    _wait_subject_in_analytics(page, "ada-from-usage")

    page.open("wallets")
    owners = page.cells("wallets", 1)
    assert len(owners) == 25  # a page
    assert owners[:3] == [colleague["email"], "customer-882", "bulk-00"]
    assert page.cells("wallets", 3)[1] == "40"  # customer-882's balance
    page.shot("wallets")
    page.click("#wallets-next")
    assert page.cells("wallets", 1) == ["bulk-23", "bulk-24", "bulk-25", "ada-from-usage"]
    assert page.cells("wallets", 2)[-1] == "subject · auto"
    assert page.js("document.getElementById('wallets-next').hidden")
    page.fill("wallet-search", {"q": "ADA-FROM"})
    page.submit("wallet-search")
    assert page.cells("wallets", 0) == [auto]
    page.fill("wallet-search", {"q": colleague["email"][:12]})
    page.submit("wallet-search")
    assert page.cells("wallets", 0) == [member_wallet]
    page.shot("wallets-search")

    # --- one wallet: buckets, holds, transactions; grant and adjust with a reason --------------------------
    hold = page.post(f"/wallets/{customer}/reservations", {"amount_minor": 15}, **{"Idempotency-Key": "seed-hold"})
    page.fill("wallet-search", {"q": "customer-882"})
    page.submit("wallet-search")
    page.js("document.querySelectorAll('#wallets tr')[1].click(); true")
    page.browser.wait(f"location.search === '?wallet={customer}' && document.body.dataset.ready === '1'")
    assert "customer-882" in page.js("document.getElementById('wallet-owner').textContent")
    assert page.cells("wallet-holds", 0) == [hold["hold"]["id"]] and page.cells("wallet-holds", 2) == ["active"]
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(second=0, microsecond=0)
    first_key = page.js("document.getElementById('grant-form').dataset.idempotencyKey")
    page.fill("grant-form", {"amount_minor": "500", "kind": "promo", "expires_at": expires.strftime("%Y-%m-%dT%H:%M"),
                             "reason": "launch goodwill"})
    page.submit("grant-form")
    assert page.js("document.getElementById('grant-form').dataset.idempotencyKey") != first_key  # fresh after success
    page.fill("adjust-form", {"amount_minor": "-120", "reason": "double top-up by support"})
    page.submit("adjust-form")
    wallet = page.get(f"/wallets/{customer}")
    assert wallet["balance"]["balance_minor"] == 40 + 500 - 120 and wallet["balance"]["held_minor"] == 15
    txs = page.get(f"/wallets/{customer}/transactions")["items"]
    assert [(t["kind"], t["amount_minor"], t["reason"]) for t in txs[:2]] == [
        ("adjustment", -120, "double top-up by support"), ("promo", 500, "launch goodwill")]
    promo = [b for b in page.get(f"/wallets/{customer}/buckets") if b["source"] == "promo"]
    assert len(promo) == 1 and datetime.fromisoformat(promo[0]["expires_at"]) == expires
    assert page.cells("wallet-transactions", 2)[:2] == ["adjustment", "promo"]
    assert "promo" in page.cells("wallet-buckets", 0)
    assert page.js("document.querySelector('#wallet-tiles [data-key=balance_minor] .value').textContent") == "420"
    assert page.js("document.querySelector('#wallet-tiles [data-key=unsettled_minor] .value').textContent") == "0"
    page.shot("wallet")

    # --- meters -------------------------------------------------------------------------------------------
    page.open("meters")
    page.fill("meter-form", {"slug": "tokens", "event_type": "llm.tokens", "aggregation": "SUM",
                             "value_property": "$.tokens", "group_by": "$.model",
                             "filters": '[{"property": "$.model", "in": ["gpt-4o", "gpt-4.1"]}]'})
    page.submit("meter-form")
    page.fill("meter-form", {"slug": "scratch", "event_type": "scratch.events", "aggregation": "COUNT"})
    page.submit("meter-form")
    meters = {m["slug"]: m for m in page.get("/meters")}
    assert meters["tokens"]["value_property"] == "$.tokens" and meters["tokens"]["group_by"] == ["$.model"]
    assert meters["tokens"]["filters"] == [{"property": "$.model", "in": ["gpt-4o", "gpt-4.1"]}]
    assert meters["scratch"]["aggregation"] == "COUNT" and meters["scratch"]["filters"] == []
    page.click_row_action("meters", "scratch", "archive")
    assert [m["slug"] for m in page.get("/meters")] == ["tokens"]
    assert page.cells("meters", 0) == ["tokens"]
    page.click_row_action("meters", "tokens", "edit")  # fills the form; saving makes version 2
    assert page.js("document.getElementById('meter-form').elements.value_property.value") == "$.tokens"
    page.fill("meter-form", {"value_property": "$.usage.total_tokens"})
    page.submit("meter-form")
    versions = page.get("/meters/tokens/versions")
    assert [(m["version"], m["value_property"]) for m in versions] == [(1, "$.tokens"), (2, "$.usage.total_tokens")]
    assert versions[1]["group_by"] == ["$.model"] and page.cells("meters", 6) == ["2"]
    assert versions[1]["filters"] == versions[0]["filters"]  # kept through the edit
    page.shot("meters")

    # --- prices, with a preview ---------------------------------------------------------------------------
    page.open("prices")
    page.fill("price-form", {"meter": "tokens", "model": "graduated", "tiers": "1000 0\ninf 0.5"})
    page.fill("preview-form", {"units": "3001"})
    page.submit("preview-form")
    assert page.js("document.getElementById('preview-result').dataset.amountMinor") == "1000"  # 2001 × 0.5 floored
    assert page.get("/prices") == []  # a preview stores nothing
    page.submit("price-form")
    prices = page.get("/prices")
    assert [p["versions"][0]["model"]["model"] for p in prices] == ["graduated"]
    assert [Decimal(t["unit_price_minor"]) for t in prices[0]["versions"][0]["model"]["tiers"]] == [0, Decimal("0.5")]
    assert page.cells("prices", 0) == ["tokens"]
    page.click_row_action("prices", "tokens", "version")
    page.fill("price-form", {"model": "per_unit", "unit_price_minor": "0.25"})
    page.submit("price-form")
    versions = page.get(f"/prices/{prices[0]['id']}")["versions"]
    assert [(v["version"], v["model"]["model"]) for v in versions] == [(1, "graduated"), (2, "per_unit")]
    assert page.get("/prices", meter="tokens")[0]["id"] == prices[0]["id"]  # a version, not a second price
    page.shot("prices")

    # --- API keys -----------------------------------------------------------------------------------------
    page.open("api-keys")
    page.fill("key-form", {"name": "ci reader"})
    page.js("document.querySelector('#key-form input[value=read]').checked = true; true")
    page.submit("key-form")
    token = page.js("document.querySelector('#key-token code').textContent")
    keys = page.get("/api-keys")
    assert [(k["name"], sorted(k["scopes"]), k["status"]) for k in keys] == [("ci reader", ["ingest", "read"], "active")]
    as_key = httpx.get(f"{api_url}/api/v1/projects/{page.project}/meters", headers={"Authorization": f"Bearer {token}"})
    assert as_key.status_code == 200, as_key.text  # the token shown once works
    page.shot("api-keys")
    page.click("#api-keys [data-action=revoke]")
    assert [k["status"] for k in page.get("/api-keys")] == ["revoked"]

    # --- subject keys -------------------------------------------------------------------------------------
    page.open("subject-keys")
    page.fill("subject-key-form", {"subject": "seat-7", "wallet_id": customer})
    page.submit("subject-key-form")
    assert {(k["subject"], k["wallet_id"]) for k in page.get("/subject-keys", limit=1000)} >= {("seat-7", customer)}
    assert "seat-7" in page.cells("subject-keys", 0)
    page.fill("subject-key-form", {"subject": "seat-8", "wallet_id": customer})
    page.submit("subject-key-form")
    page.shot("subject-keys")
    page.click_row_action("subject-keys", "seat-8", "remove")
    subjects = {k["subject"] for k in page.get("/subject-keys", limit=1000)}
    assert "seat-8" not in subjects and "seat-7" in subjects

    # --- members and invitations --------------------------------------------------------------------------
    page.open("team")
    invitee = f"invitee-{uuid.uuid4().hex[:6]}@example.com"
    page.fill("invite-form", {"email": invitee, "role": "viewer"})
    page.submit("invite-form")
    assert [(i["email"], i["role"], i["status"]) for i in page.get("/invitations")] == [(invitee, "viewer", "pending")]
    page.js(f"(() => {{ const s = document.querySelector('[data-role-of=\"{colleague['email']}\"]'); s.value = 'admin'; "
            "s.dispatchEvent(new Event('change')); return true; })()")
    page.settle()
    roles = {m["email"]: m["role"] for m in page.get("/members")}
    assert roles == {owner_email: "owner", colleague["email"]: "admin"}
    page.shot("team")
    page.click_row_action("invitations", invitee, "revoke")
    assert [i["status"] for i in page.get("/invitations")] == ["revoked"]

    # --- feature costs ------------------------------------------------------------------------------------
    page.open("feature-costs")
    page.fill("feature-form", {"feature_key": "image_to_image", "cost_minor": "5", "description": "Image to image"})
    page.submit("feature-form")
    page.fill("feature-form", {"feature_key": "export_pdf", "cost_minor": "0", "requires_entitlement": "*"})
    page.submit("feature-form")
    costs = {c["feature_key"]: (c["cost_minor"], c["requires_entitlement"]) for c in page.get("/feature-costs")}
    assert costs == {"image_to_image": (5, None), "export_pdf": (0, "*")}
    page.shot("feature-costs")
    page.click_row_action("feature-costs", "export_pdf", "remove")
    assert [c["feature_key"] for c in page.get("/feature-costs")] == ["image_to_image"]

    # --- packs and plans ----------------------------------------------------------------------------------
    page.open("offers")
    page.fill("offer-form", {"kind": "pack", "slug": "starter", "name": "Starter", "credits_minor": "1000",
                             "price_minor": "900", "currency": "usd"})
    page.submit("offer-form")
    page.fill("offer-form", {"kind": "pack", "slug": "Not A Slug", "name": "Bad", "credits_minor": "1",
                             "price_minor": "1", "currency": "usd"})
    page.js("document.querySelector('#offer-form button[type=submit]').click(); true")
    assert page.browser.wait("document.body.dataset.ready") == "error"
    assert page.js("document.getElementById('error').textContent").startswith("slug: ")  # the field, not "see errors"
    assert [o["slug"] for o in page.get("/credit-packs")] == ["starter"]
    page.fill("offer-form", {"kind": "plan", "slug": "pro", "name": "Pro", "credits_minor": "5000",
                             "price_minor": "2900", "currency": "usd", "interval": "month", "credits_expire": "never"})
    page.submit("offer-form")
    assert [(o["slug"], o["credits_minor"], o["price_minor"]) for o in page.get("/credit-packs")] == [("starter", 1000, 900)]
    plans = page.get("/plans")
    assert [(o["slug"], o["interval"], o["credits_expire"]) for o in plans] == [("pro", "month", "never")]
    page.shot("offers")
    page.fill("offer-form", {"kind": "pack", "slug": "old-pack", "name": "Old", "credits_minor": "10",
                             "price_minor": "100", "currency": "usd"})
    page.submit("offer-form")
    page.click_row_action("packs", "old-pack", "archive")
    assert [o["slug"] for o in page.get("/credit-packs")] == ["starter"]  # archived ones are not for sale

    # --- billing rules ------------------------------------------------------------------------------------
    page.open("billing")
    page.fill("rule-form", {"name": "Seat fee", "wallet_id": customer, "amount_minor": "30",
                            "schedule_kind": "weekly", "schedule_value": "mon, thu", "when_insufficient": "skip"})
    page.submit("rule-form")
    rules = page.get("/billing-rules")
    assert [(r["name"], r["amount_minor"], r["schedule"]["kind"], r["schedule"]["days"], r["when_insufficient"])
            for r in rules] == [("Seat fee", 30, "weekly", ["mon", "thu"], "skip")]
    page.click("#billing-rules [data-action=pause]")
    assert [r["status"] for r in page.get("/billing-rules")] == ["paused"]
    page.shot("billing")

    # --- the paywall page says what it shows once there are decisions -------------------------------------
    assert page.post("/access/check", {"wallet_id": customer, "feature_key": "image_to_image"})["allowed"]
    assert page.post("/access/check", {"wallet_id": member_wallet, "feature_key": "image_to_image"})["allowed"] is False
    _relay_outbox(database_url, topics)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        funnel = page.get("/analytics/paywall-funnel")
        if sum(int(r["decisions"]) for r in funnel["reasons"]) >= 2:
            break
        time.sleep(0.3)
    page.open("paywall")
    note = page.js("document.getElementById('paywall-note').textContent")
    assert note and "Empty until" not in note and "No access decisions" not in note, note
    assert len(page.cells("reasons", 1)) == 2
    page.shot("paywall")

    # --- the audit log: emails, diffs, filters ------------------------------------------------------------
    page.open("audit")
    assert owner_email in page.cells("audit", 2) and not any(a.startswith("usr_") for a in page.cells("audit", 2))
    role_row = page.js("[...document.querySelectorAll('#audit tr')].find(r => r.cells[1].textContent === "
                       "'member.role_change').cells[4].textContent")
    assert role_row == "role: member → admin"
    assert f"member {colleague['email']}" in page.cells("audit", 3)
    page.fill("audit-filter", {"action": "wallet.*"})
    page.submit("audit-filter")
    actions = page.cells("audit", 1)
    assert set(actions) == {"wallet.create", "wallet.grant", "wallet.adjust", "wallet.reserve"}
    assert actions.count("wallet.create") == 2 + 26 and actions.count("wallet.grant") == 2
    adjust_reason = page.js("[...document.querySelectorAll('#audit tr')].find(r => r.cells[1].textContent === "
                            "'wallet.adjust').cells[4].textContent")
    assert "reason: double top-up by support" in adjust_reason
    page.shot("audit")
    page.fill("audit-filter", {"action": "", "actor_email": owner_email,
                               "until": (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d")})
    page.submit("audit-filter")
    assert page.cells("audit", 0) == ["no entries match"]

    # --- a viewer sees the pages without the forms it may not use ------------------------------------------
    viewer = httpx.post(f"{api_url}/api/v1/auth/signup", json={
        "email": f"viewer-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD}).json()
    page.post("/members", {"user_id": viewer["user"]["id"], "role": "viewer"})
    page.js(f"sessionStorage.setItem('meterline.token', {viewer['access_token']!r}); true")
    page.open("meters")
    assert page.cells("meters", 0) == ["tokens"]
    assert page.js("document.getElementById('meter-form').offsetParent === null "
                   "&& document.querySelector('#meters button.row-action').offsetParent === null")
    page.shot("viewer-meters")

    # --- signing up twice says to sign in -----------------------------------------------------------------
    page.js("sessionStorage.clear(); true")
    page.open("signup")
    page.fill("signup-form", {"email": owner_email, "password": PASSWORD, "project": "Again"})
    page.js("document.querySelector('#signup-form button[type=submit]').click(); true")
    assert page.browser.wait("document.body.dataset.ready") == "error"
    assert "already exists" in page.js("document.getElementById('error').textContent")
    assert page.js("document.querySelector('#error a').getAttribute('href')") == "/dashboard/login"
    assert not [line for line in browser.console if line.startswith("exception")], browser.console
