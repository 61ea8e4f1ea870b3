"""The dashboard in headless Debian Chromium, driven over the DevTools protocol, against a real api process
(embedded ClickHouse owned by that process, its sink thread fed from the real broker).

Checks that each page loads, signs in through the tenancy login, and that the charts hold the right data
(read back from the Chart.js objects in the page); screenshots go to test-artifacts/."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from dashboard_testkit import ARTIFACTS, PASSWORD
from dashboard_testkit import open_page as _open

from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS
from ledger.kafka import make_producer
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS

pytestmark = [pytest.mark.browser, pytest.mark.integration]



def _worker_dead_letter(project: str, *, source_topic: str) -> Any:
    """The dead letter the streams worker produces for an event whose ``time`` is unparseable: the worker's
    own validation makes the rejection and its own builder the message (never a hand-made shape)."""
    from streams.dead_letters import dead_letter_message
    from streams.metering import Limits, Rejection, validate_event

    raw = {"specversion": "1.0", "id": "evt-bad-time", "source": "browser-test", "type": "tokens",
           "subject": "ada", "project": project, "time": "yesterday", "data": {"units": "1"}}
    value = orjson.dumps(raw)
    rejection = validate_event(raw, index=None, message=value, arrival=datetime.now(UTC), limits=Limits())
    assert isinstance(rejection, Rejection)
    return dead_letter_message(rejection, source_topic=source_topic, partition=0, offset=0, now=datetime.now(UTC))


def _seed(api_url: str, topics: Any) -> dict[str, Any]:
    """A user, a project, ledger transactions and usage events of the last days. Returns what pages must show."""
    email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    r = httpx.post(f"{api_url}/api/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    token = r.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    r = httpx.post(f"{api_url}/api/v1/projects", json={"name": "Browser Co"}, headers=headers)
    assert r.status_code == 201, r.text
    project = r.json()["id"]
    # usage analytics count units as a meter defines them: the seeded "tokens" events need their meter
    r = httpx.post(f"{api_url}/api/v1/projects/{project}/meters", headers=headers, json={
        "slug": "tokens", "event_type": "tokens", "aggregation": "SUM", "value_property": "$.units"})
    assert r.status_code == 201, r.text
    now = datetime.now(UTC)
    ledger = [  # (wallet, kind, amount, days ago, bucket source, source ref)
        ("wA", "top_up", 1000, 10, "top_up", "pack:starter:cs_1"), ("wA", "usage", -300, 5, None, None),
        ("wA", "bonus", 200, 3, "bonus", None), ("wA", "expiry", -100, 2, None, None),
        ("wB", "subscription_grant", 500, 4, "subscription", "plan:pro:c1"), ("wB", "debit", -50, 1, None, None)]
    producer = make_producer(topics.bootstrap)
    balances: dict[str, int] = defaultdict(int)
    for n, (wallet, kind, amount, days, source, ref) in enumerate(ledger, start=1):
        before = balances[wallet]
        balances[wallet] += amount
        producer.produce(topics.name(TOPIC_LEDGER_TRANSACTIONS), key=wallet, value=orjson.dumps({
            "transaction_id": n, "project_id": project, "wallet_id": wallet, "kind": kind, "amount_minor": amount,
            "balance_before_minor": before, "balance_after_minor": balances[wallet], "idempotency_key": f"k{n}",
            "created_at": (now - timedelta(days=days)).isoformat(), "bucket_source": source, "source_ref": ref}))
    units: dict[str, Decimal] = defaultdict(Decimal)
    for i in range(30):
        subject = ("ada", "bob", "cy")[i % 3]
        value = Decimal(i + 1)
        units[subject] += value
        producer.produce(topics.name(TOPIC_USAGE_EVENTS), key=subject, value=orjson.dumps({
            "specversion": "1.0", "id": uuid.uuid4().hex, "source": "browser-test", "type": "tokens",
            "subject": subject, "project": project, "time": (now - timedelta(hours=i % 20)).isoformat(),
            "data": {"units": str(value)}}))
    letter = _worker_dead_letter(project, source_topic=topics.name(TOPIC_USAGE_EVENTS))
    producer.produce(topics.name(TOPIC_USAGE_DLQ), value=letter.value, headers=letter.headers)
    assert producer.flush(30) == 0
    base = f"{api_url}/api/v1/projects/{project}/analytics"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        summary = httpx.get(f"{base}/wallets/summary", headers=headers).json()
        totals = httpx.get(f"{base}/usage/totals", headers=headers).json()
        dead = httpx.get(f"{base}/dead-letters", headers=headers).json()
        if summary.get("transactions") == len(ledger) and sum(m["events"] for m in totals.get("meters", [])) == 30 \
                and dead.get("dead_letters"):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the api's sink did not store the seeded messages")
    return {"email": email, "project": project, "units": dict(units), "issued": 1700, "spent": 350,
            "expired": 100, "sources": {"top_up": 1000, "subscription": 500, "bonus": 200}}


def _charts(browser: Any, name: str) -> Any:
    return browser.evaluate(
        f"(() => {{ const c = window.meterlineCharts[{name!r}]; return c && {{labels: c.data.labels, "
        "datasets: c.data.datasets.map(d => ({label: d.label, data: d.data.map(Number)}))}; })()")


def _seed_billing(api_url: str, database_url: str, email: str, project: str) -> None:
    """A funded wallet and a daily fee the scheduler's job has run for two days (one run left unpaid: debt)."""
    from ledger import billing
    from ledger.db import make_engine

    token = httpx.post(f"{api_url}/api/v1/auth/login", json={"email": email, "password": PASSWORD}).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    base = f"{api_url}/api/v1/projects/{project}"
    wallet = httpx.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": "seat-holder"},
                        headers=headers).json()["id"]
    r = httpx.post(f"{base}/wallets/{wallet}/grants", json={"amount_minor": 150},
                   headers={**headers, "Idempotency-Key": "browser-grant"})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{base}/billing-rules", json={"wallet_id": wallet, "name": "Seat fee", "amount_minor": 100,
                                                  "schedule": {"kind": "daily"}}, headers=headers)
    assert r.status_code == 201, r.text
    engine = make_engine(database_url, pool_size=1)
    try:
        for _ in range(3):
            with engine.begin() as conn:
                billing.run_due(conn, now=datetime.now(UTC) + timedelta(days=2))
    finally:
        engine.dispose()


def _seed_reconciliation(database_url: str, project: str) -> None:
    """A finished four-record report in which ClickHouse usage lacks a row of wallet wA (as the scheduler's
    reconcile_usage job records it; tests/integration/pipeline/test_reconcile_four_records.py makes real ones)."""
    from ledger.db import make_engine
    from ledger.reconciliation import record_report

    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            record_report(conn, source_topic="usage.events.v1", replay_id="rp_browser", marks={"0": 29},
                          started_at=datetime.now(UTC), messages=30, incomplete=[], differences=[], drift_minor=0,
                          coverage={r: {"compared": True} for r in ("usage_log", "ledger", "clickhouse_usage",
                                                                     "clickhouse_flow")},
                          mismatches=[{"project_id": project, "wallet_id": "wA", "meter_id": "tokens",
                                       "period_start": "2026-12-01T00:00:00+00:00", "price_version_id": "pv",
                                       "measure": "units", "cut": "ledger mark", "amount_minor": 8,
                                       "values": {"usage_log": "30", "ledger": "30", "clickhouse_usage": "10"},
                                       "disagreeing": ["clickhouse_usage"]}])
    finally:
        engine.dispose()


def test_dashboard_pages_show_the_project_figures(api_url, topics, browser, stack_env):
    seeded = _seed(api_url, topics)
    _seed_billing(api_url, stack_env["DATABASE_URL"], seeded["email"], seeded["project"])
    dash = f"{api_url}/dashboard"

    _open(browser, f"{dash}/usage")  # no token yet: redirected to the login page
    assert browser.evaluate("location.pathname") == "/dashboard/login"
    assert browser.evaluate("document.getElementById('nav').hidden && document.getElementById('controls').hidden")
    browser.screenshot(ARTIFACTS / "dashboard-login.png")
    browser.evaluate(f"document.getElementById('email').value = {seeded['email']!r}; "
                     f"document.getElementById('password').value = {PASSWORD!r}; "
                     "document.getElementById('login-form').requestSubmit(); true")
    browser.wait("location.pathname === '/dashboard/usage' && document.body.dataset.ready === '1'")
    assert browser.evaluate("sessionStorage.getItem('meterline.project')") == seeded["project"]
    assert browser.evaluate("!document.getElementById('nav').hidden")

    usage = _charts(browser, "usage")
    assert [d["label"] for d in usage["datasets"]] == ["tokens"]
    assert Decimal(str(sum(usage["datasets"][0]["data"]))) == sum(seeded["units"].values())
    top = _charts(browser, "top")
    assert dict(zip(top["labels"], top["datasets"][0]["data"], strict=True)) == {
        s: 10 for s in seeded["units"]}  # events per subject across meters
    browser.screenshot(ARTIFACTS / "dashboard-usage.png")

    _open(browser, f"{dash}/credits")
    flow = {d["label"]: sum(d["data"]) for d in _charts(browser, "flow")["datasets"]}
    assert flow == {"issued": seeded["issued"], "spent": seeded["spent"], "expired": seeded["expired"]}
    sources = _charts(browser, "sources")
    assert dict(zip(sources["labels"], sources["datasets"][0]["data"], strict=True)) == seeded["sources"]
    tiles = browser.evaluate("Object.fromEntries([...document.querySelectorAll('#credit-tiles .tile')]"
                             ".map(t => [t.dataset.key, t.querySelector('.value').textContent]))")
    assert tiles["net_movement_minor"] == "1,250" and tiles["utilization_rate"] == "20.6%"
    assert browser.evaluate("document.querySelectorAll('#revenue tr').length") == 3  # header + pack + plan
    browser.screenshot(ARTIFACTS / "dashboard-credits.png")

    _open(browser, f"{dash}/wallets")  # the ledger's wallets above, analytics' top spenders below
    assert browser.evaluate("[...document.querySelectorAll('#top-wallets tr')].slice(1)"
                            ".map(r => r.cells[0].textContent)") == ["wA", "wB"]
    assert browser.evaluate("[...document.querySelectorAll('#wallets tr')].slice(1)"
                            ".map(r => r.cells[1].textContent)") == ["seat-holder"]
    browser.screenshot(ARTIFACTS / "dashboard-wallets-top.png")

    _open(browser, f"{dash}/paywall")
    funnel = _charts(browser, "funnel")
    assert funnel["labels"] == ["requested", "paywalled", "purchased", "returned"]
    browser.screenshot(ARTIFACTS / "dashboard-paywall.png")

    _open(browser, f"{dash}/billing")
    runs = {d["label"]: sum(d["data"]) for d in _charts(browser, "billing")["datasets"]}
    assert runs == {"charged": 1, "debt": 1}  # 150 credits pay one 100 fee; the second leaves a debt of 50
    assert browser.evaluate("[...document.querySelectorAll('#billing-rules tr')].slice(1)"
                            ".map(r => r.cells[0].textContent)") == ["Seat fee"]
    assert browser.evaluate("[...document.querySelectorAll('#billing-runs tr')].slice(1)"
                            ".map(r => r.cells[3].textContent)") == ["debt", "charged"]
    browser.screenshot(ARTIFACTS / "dashboard-billing.png")

    _open(browser, f"{dash}/audit")
    actions = browser.evaluate("[...document.querySelectorAll('#audit tr')].slice(1).map(r => r.cells[1].textContent)")
    assert "project.create" in actions
    browser.screenshot(ARTIFACTS / "dashboard-audit.png")

    _open(browser, f"{dash}/dead-letters")
    assert browser.evaluate("[...document.querySelectorAll('#dead-letters tr')].slice(1)"
                            ".map(r => r.cells[1].textContent)") == ["bad_time"]
    browser.screenshot(ARTIFACTS / "dashboard-dead-letters.png")

    _open(browser, f"{dash}/reconciliation")  # before any report
    assert "No reconciliation" in browser.evaluate("document.getElementById('recon-summary').textContent")
    _seed_reconciliation(stack_env["DATABASE_URL"], seeded["project"])
    _open(browser, f"{dash}/reconciliation")
    states = browser.evaluate("Object.fromEntries([...document.querySelectorAll('#recon-records .tile')]"
                              ".map(t => [t.dataset.key, t.dataset.state]))")
    assert states == {"usage_log": "ok", "ledger": "ok", "clickhouse_usage": "drift", "clickhouse_flow": "ok"}
    assert browser.evaluate("[...document.querySelectorAll('#recon-wallets tr')].slice(1)"
                            ".map(r => [r.cells[0].textContent, r.cells[1].textContent])") == [
        ["wA", "clickhouse_usage"]]
    row = browser.evaluate("[...document.querySelectorAll('#recon-mismatches tr')][1].innerText")
    assert "wA" in row and "tokens" in row and "2026-12-01" in row and "clickhouse_usage disagrees" in row
    browser.screenshot(ARTIFACTS / "dashboard-reconciliation.png")
    assert not [line for line in browser.console if line.startswith("exception")], browser.console
