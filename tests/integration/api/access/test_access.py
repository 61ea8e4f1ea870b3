"""Access checks over HTTP against the real PostgreSQL: every denial reason (debt, missing entitlement, not enough
credits), allowed checks with and without a charge, idempotent charges (replay, conflict, purged record), roles,
refunds that revoke access at once, the decision record (one row and one outbox message per decision, append-only)
and its listing. Concurrency over real HTTP: 200 charged checks on one wallet, each sent twice, never overspend."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient
from payments_testkit import rc_body, send, shop
from tenancy_testkit import (
    Team,
    api_client,
    create_project,
    five_users,
    live_server,
    money,
    owner_and_project,
    signup,
    sql,
    team,
)

from analytics.rows import Origin, decision_rows

pytestmark = pytest.mark.integration

FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01


def _base(project_id: str) -> str:
    return f"/api/v1/projects/{project_id}"


def _check(client: TestClient, project_id: str, headers: dict[str, str], key: str | None = None,
           **body: Any) -> Any:
    return client.post(f"{_base(project_id)}/access/check", json=body,
                       headers={**headers, **({"Idempotency-Key": key} if key else {})})


def _decision(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _feature(client: TestClient, t: Team, key: str, cost: int, gate: str | None = None) -> Any:
    return client.put(f"{_base(t.project_id)}/feature-costs/{key}", json={"cost_minor": cost,
                                                                           "requires_entitlement": gate},
                      headers=t.by_role["admin"].headers)


def _wallet(client: TestClient, t: Team, subject: str, grant: int = 0) -> str:
    r = client.post(f"{_base(t.project_id)}/wallets", json={"owner_kind": "subject", "owner_ref": subject},
                    headers=t.by_role["owner"].headers)
    assert r.status_code in (200, 201), r.text
    wallet = str(r.json()["id"])
    if grant:
        g = money(client, f"{_base(t.project_id)}/wallets/{wallet}/grants", {"amount_minor": grant, "kind": "top_up"},
                  t.by_role["admin"].headers)
        assert g.status_code == 201, g.text
    return wallet


def _balance(client: TestClient, t: Team, wallet: str) -> int:
    return int(client.get(f"{_base(t.project_id)}/wallets/{wallet}", headers=t.by_role["viewer"].headers
                          ).json()["balance"]["balance_minor"])


def _records_match_outbox(database_url: str, project_id: str) -> list[tuple[Any, ...]]:
    """Every decision row has exactly one outbox message, which analytics parses into the same decision."""
    rows = sql(database_url, "SELECT id, subject, wallet_id, allowed, coalesce(reason, ''), policy_id, cost_minor "
                             "FROM access_decisions WHERE project_id = %s ORDER BY id", project_id)
    messages = sql(database_url, "SELECT key, payload FROM outbox WHERE topic = 'access.decisions.v1' "
                                 "AND convert_from(payload, 'UTF8')::jsonb ->> 'project_id' = %s", project_id)
    origin = Origin("access.decisions.v1", 0, 0, __import__("datetime").datetime.now(__import__("datetime").UTC))
    parsed = []
    for key, payload in messages:
        result = decision_rows(bytes(payload), origin)
        assert result.rejected == 0 and len(result.rows) == 1
        row = result.rows[0]
        assert key == row[3]  # keyed by wallet
        parsed.append((row[0], row[2], row[3], bool(row[6]), row[7], row[8], row[9]))
    assert sorted(parsed) == rows
    return rows


def test_denial_reasons_allowed_checks_roles_and_the_record(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        member, viewer = users["member"].headers, users["viewer"].headers
        assert _feature(client, t, "gen", 5).status_code == 200
        assert _feature(client, t, "export", 0, "*").status_code == 200
        unknown_plan = _feature(client, t, "upscale", 2, "pro")
        assert unknown_plan.status_code == 422 and unknown_plan.json()["code"] == "api.unknown_plan"
        listed = client.get(f"{_base(t.project_id)}/feature-costs", headers=viewer).json()
        assert {f["feature_key"]: f["requires_entitlement"] for f in listed} == {"export": "*", "gen": None}
        assert _feature(client, t, "export", 0, "Not a slug").status_code == 422
        audit = client.get(f"{_base(t.project_id)}/audit-log", params={"action": "feature_cost.put"},
                           headers=users["admin"].headers).json()["items"]
        assert {a["after"]["feature_key"]: a["after"]["requires_entitlement"] for a in audit} == {
            "export": "*", "gen": None}

        alice = _wallet(client, t, "alice", grant=12)
        # not enough credits: 3 × 5 > 12
        d = _decision(_check(client, t.project_id, member, wallet_id=alice, feature_key="gen", quantity=3))
        assert (d["allowed"], d["reason"], d["policy_id"], d["cost_minor"], d["subject"]) == (
            False, "insufficient_credits", "credit_balance", 15, "alice")
        # enough, without a charge: allowed and nothing moves (a viewer may ask)
        d = _decision(_check(client, t.project_id, viewer, wallet_id=alice, feature_key="gen", quantity=2,
                             asset_id="model:llm-base", action="execute"))
        assert (d["allowed"], d["reason"], d["cost_minor"], d["charged"], d["transaction_id"], d["balance"]) == (
            True, None, 10, False, None, None)
        assert (d["asset_id"], d["action"]) == ("model:llm-base", "execute")
        assert _balance(client, t, alice) == 12
        # a plan-only feature, and alice has no plan
        d = _decision(_check(client, t.project_id, member, subject="alice", feature_key="export"))
        assert (d["allowed"], d["reason"], d["policy_id"], d["wallet_id"]) == (
            False, "upgrade_required", "entitlement_gate", alice)
        # an unknown feature is a clear 422 and not a decision
        r = _check(client, t.project_id, member, wallet_id=alice, feature_key="nope")
        assert r.status_code == 422 and r.json()["code"] == "api.unknown_feature"
        assert _check(client, t.project_id, member, feature_key="gen").status_code == 422  # no wallet nor subject
        assert _feature(client, t, "huge", 10**15).status_code == 200
        assert _check(client, t.project_id, member, wallet_id=alice, feature_key="huge", quantity=2).status_code == 422

        # in debt: blocked for every feature until settled
        bob = _wallet(client, t, "bob", grant=10)
        r = money(client, f"{_base(t.project_id)}/wallets/{bob}/adjustments",
                  {"amount_minor": -15, "reason": "chargeback"}, users["admin"].headers)
        assert r.status_code == 201, r.text
        for feature in ("gen", "export"):
            d = _decision(_check(client, t.project_id, member, wallet_id=bob, feature_key=feature, charge=True,
                                 key=uuid.uuid4().hex))
            assert (d["allowed"], d["reason"], d["policy_id"], d["charged"]) == (
                False, "wallet_blocked", "debt_block", False)
        money(client, f"{_base(t.project_id)}/wallets/{bob}/grants", {"amount_minor": 20},
              users["admin"].headers).raise_for_status()  # settles the 5 of debt first
        d = _decision(_check(client, t.project_id, member, wallet_id=bob, feature_key="gen", charge=True,
                             key=uuid.uuid4().hex))
        assert (d["allowed"], d["charged"], d["balance_after_minor"], d["balance"]["balance_minor"]) == (
            True, True, 10, 10)

        # a subject never seen: no wallet yet, so no credits — a paywall denial on the wallet usage would create
        from streams.catalog_model import auto_wallet_id
        d = _decision(_check(client, t.project_id, viewer, subject="newcomer", feature_key="gen"))
        assert (d["allowed"], d["reason"], d["wallet_id"], d["subject"]) == (
            False, "insufficient_credits", auto_wallet_id(t.project_id, "newcomer"), "newcomer")
        d = _decision(_check(client, t.project_id, member, key="new-1", subject="newcomer", feature_key="gen",
                             charge=True))
        assert (d["allowed"], d["reason"], d["charged"]) == (False, "insufficient_credits", False)
        assert sql(database_url, "SELECT count(*) FROM wallets WHERE owner_ref = 'newcomer'") == [(0,)]

        # roles: a viewer cannot charge, a member can; a charge needs a key; strangers see nothing
        r = _check(client, t.project_id, viewer, key="v-1", wallet_id=alice, feature_key="gen", charge=True)
        assert r.status_code == 403
        r = _check(client, t.project_id, member, wallet_id=alice, feature_key="gen", charge=True)
        assert r.status_code == 400 and r.json()["code"] == "api.idempotency_key_required"
        outsider = users["outsider"].headers
        assert _check(client, t.project_id, outsider, wallet_id=alice, feature_key="gen").status_code == 404
        stranger = signup(client, "stranger")
        foreign = create_project(client, stranger, "Foreign")
        client.put(f"{_base(foreign)}/feature-costs/gen", json={"cost_minor": 1},
                   headers=stranger.headers).raise_for_status()
        r = _check(client, foreign, stranger.headers, key="s-1", wallet_id=alice, feature_key="gen", charge=True)
        assert r.status_code == 404  # alice's wallet is not in the stranger's project
        assert _check(client, t.project_id, stranger.headers, wallet_id=alice, feature_key="gen").status_code == 404
        assert _balance(client, t, alice) == 12

        # the record: one row and one outbox message per decision, nothing for refusals (4xx)
        rows = _records_match_outbox(database_url, t.project_id)
        assert len(rows) == 8
        assert sql(database_url, "SELECT count(*) FROM access_decisions") == [(8,)]
        with pytest.raises(psycopg.errors.RestrictViolation):
            sql(database_url, "UPDATE access_decisions SET allowed = true")
        with pytest.raises(psycopg.errors.RestrictViolation):
            sql(database_url, "DELETE FROM access_decisions")

        # the listing: filters and cursor pagination, newest first
        url = f"{_base(t.project_id)}/access/decisions"
        every = client.get(url, params={"limit": 500}, headers=viewer).json()["items"]
        assert len(every) == 8 and [d["created_at"] for d in every] == sorted((d["created_at"] for d in every),
                                                                             reverse=True)
        paged: list[str] = []
        cursor = None
        while True:
            page = client.get(url, params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=viewer).json()
            paged += [d["decision_id"] for d in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert paged == [d["decision_id"] for d in every]
        denied = client.get(url, params={"allowed": "false"}, headers=viewer).json()["items"]
        assert sorted(d["reason"] for d in denied) == ["insufficient_credits", "insufficient_credits",
                                                       "insufficient_credits", "upgrade_required", "wallet_blocked",
                                                       "wallet_blocked"]
        blocked = client.get(url, params={"reason": "wallet_blocked", "wallet_id": bob}, headers=viewer).json()
        assert len(blocked["items"]) == 2
        assert client.get(url, params={"reason": "bogus"}, headers=viewer).status_code == 422
        assert client.get(url, params={"cursor": "nonsense"}, headers=viewer).status_code == 422
        later = client.get(url, params={"since": every[0]["created_at"]}, headers=viewer).json()["items"]
        assert every[0]["decision_id"] in [d["decision_id"] for d in later]
        assert client.get(url, params={"until": every[-1]["created_at"]}, headers=viewer).json()["items"] == []
        assert client.get(url, headers=outsider).status_code == 404


def test_openapi_documents_the_access_routes(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        spec = client.get("/openapi.json").json()
    check = spec["paths"]["/api/v1/projects/{project_id}/access/check"]["post"]
    assert check["summary"] and {"200", "400", "403", "404", "409", "422"} <= set(check["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in check["parameters"])
    listing = spec["paths"]["/api/v1/projects/{project_id}/access/decisions"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"allowed", "reason", "wallet_id", "since", "until", "cursor"}
    for schema in ("AccessCheckRequest", "AccessCheckOut", "AccessDecisionOut", "FeatureCostPut", "FeatureCostOut"):
        assert spec["components"]["schemas"][schema].get("examples"), schema
    assert "requires_entitlement" in spec["components"]["schemas"]["FeatureCostPut"]["properties"]


def test_charged_checks_debit_once_per_key(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        member = users["member"].headers
        _feature(client, t, "gen", 5).raise_for_status()
        wallet = _wallet(client, t, "carol", grant=12)
        body = {"wallet_id": wallet, "feature_key": "gen", "quantity": 2, "charge": True}

        first = _check(client, t.project_id, member, key="job-1", **body)
        d = _decision(first)
        assert first.headers["Idempotent-Replayed"] == "false"
        assert (d["allowed"], d["charged"], d["cost_minor"], d["balance_after_minor"]) == (True, True, 10, 2)
        again = _check(client, t.project_id, member, key="job-1", **body)
        assert again.headers["Idempotent-Replayed"] == "true" and again.json() == d
        conflict = _check(client, t.project_id, member, key="job-1", **{**body, "quantity": 1})
        assert conflict.status_code == 409 and conflict.json()["code"] == "api.idempotency_conflict"
        assert _balance(client, t, wallet) == 2

        # the ledger's debit carries the decision; the audit log has the charge
        tx = sql(database_url, "SELECT id, kind, amount_minor, metadata ->> 'decision_id' FROM transactions "
                               "WHERE wallet_id = %s AND kind = 'debit'", wallet)
        assert tx == [(d["transaction_id"], "debit", -10, d["decision_id"])]
        audit = client.get(f"{_base(t.project_id)}/audit-log", params={"action": "access.charge"},
                           headers=users["admin"].headers).json()["items"]
        assert [(a["target_id"], a["after"]["decision_id"]) for a in audit] == [(str(tx[0][0]), d["decision_id"])]

        # a denial is an answer too: replayed as it was, even after credits arrive
        denied = _decision(_check(client, t.project_id, member, key="job-2", **body))
        assert (denied["allowed"], denied["reason"], denied["charged"]) == (False, "insufficient_credits", False)
        money(client, f"{_base(t.project_id)}/wallets/{wallet}/grants", {"amount_minor": 100},
              users["admin"].headers).raise_for_status()
        assert _check(client, t.project_id, member, key="job-2", **body).json() == denied

        # idempotency records are purged after days; a retry then finds the ledger key's debit and its decision
        sql(database_url, "DELETE FROM idempotency_records WHERE idempotency_key = 'job-1'")
        late = _check(client, t.project_id, member, key="job-1", **body)
        assert late.status_code == 200 and late.headers["Idempotent-Replayed"] == "true"
        assert late.json()["decision_id"] == d["decision_id"] and late.json()["transaction_id"] == d["transaction_id"]
        assert sql(database_url, "SELECT count(*) FROM transactions WHERE wallet_id = %s AND kind = 'debit'",
                   wallet) == [(1,)]
        assert _balance(client, t, wallet) == 102

        # an uncharged check with a key is idempotent the same way
        look = {"wallet_id": wallet, "feature_key": "gen"}
        one = _decision(_check(client, t.project_id, users["viewer"].headers, key="look-1", **look))
        assert _check(client, t.project_id, users["viewer"].headers, key="look-1", **look).json() == one
        rows = _records_match_outbox(database_url, t.project_id)
        assert len(rows) == 3


def test_a_refund_revokes_access_at_once(database_url: str, engines: Any) -> None:
    """RevenueCat: a subscription purchase entitles the subscriber; the refund claws the credits back (into debt,
    200 were spent) and ends the entitlement — the very next check is denied; the reversal restores access."""
    subscriber = "$RCAnonymousID:12345678-1234-ABCD-1234-123456789123"
    with api_client(database_url, engines) as client:
        s = shop(client)
        s.offer("plan", slug="monthly", name="monthly", credits_minor=700, price_minor=499, currency="usd",
                interval="month", revenuecat_product_id="com.revenuecat.myapp.monthly")
        headers = s.owner.headers
        for key, cost, gate in (("pro_export", 0, "monthly"), ("gen", 100, "*")):
            client.put(f"{s.base}/feature-costs/{key}", json={"cost_minor": cost, "requires_entitlement": gate},
                       headers=headers).raise_for_status()
        before = _decision(_check(client, s.project_id, headers, subject=subscriber, feature_key="pro_export"))
        assert before["reason"] == "upgrade_required"

        purchase = rc_body("revenuecat/initial_purchase.json", id="evt-purchase", app_user_id=subscriber,
                           product_id="com.revenuecat.myapp.monthly", transaction_id="100000000000000",
                           original_transaction_id="100000000000000", event_timestamp_ms=1601258901000,
                           purchased_at_ms=1601258901000, expiration_at_ms=FAR_FUTURE_MS)
        assert send(client, s.project_id, "revenuecat", purchase).json()["status"] == "processed"
        wallet = s.wallet_of(subscriber)
        assert wallet == before["wallet_id"]  # the denied subject's wallet is the one the purchase created
        assert _decision(_check(client, s.project_id, headers, subject=subscriber, feature_key="pro_export"))["allowed"]
        charged = _decision(_check(client, s.project_id, headers, key="use-1", subject=subscriber, feature_key="gen",
                                   quantity=2, charge=True))
        assert (charged["allowed"], charged["balance_after_minor"]) == (True, 500)

        r = send(client, s.project_id, "revenuecat", "revenuecat/refund_cancellation_customer_support.json")
        assert r.json()["status"] == "processed", r.text
        assert s.balance(wallet) == -200
        for feature in ("pro_export", "gen"):
            d = _decision(_check(client, s.project_id, headers, subject=subscriber, feature_key=feature))
            assert (d["allowed"], d["reason"]) == (False, "wallet_blocked")

        reversed_refund = rc_body("revenuecat/refund_reversed.json", id="evt-reversed", app_user_id=subscriber,
                                  transaction_id="100000000000000", original_transaction_id="100000000000000")
        assert send(client, s.project_id, "revenuecat", reversed_refund).json()["status"] == "processed"
        assert s.balance(wallet) == 500
        # the credits are back but the refund ended the subscription for good: unblocked, still no plan features
        (ent,) = s.entitlements(wallet)
        assert (ent["status"], ent["active"]) == ("ended", False)
        for feature in ("pro_export", "gen"):
            d = _decision(_check(client, s.project_id, headers, subject=subscriber, feature_key=feature))
            assert (d["allowed"], d["reason"]) == (False, "upgrade_required")
        _records_match_outbox(database_url, s.project_id)


CONCURRENT = 200
GRANTED = 1_000
COST = 7


def test_200_concurrent_charged_checks_on_one_wallet_never_overspend(database_url: str, engines: Any) -> None:
    with live_server(database_url, engines, rate_limit_per_s=0) as base_url, \
            httpx.Client(base_url=base_url, timeout=30) as setup:
        headers, project = owner_and_project(setup, "Race")
        setup.put(f"/api/v1/projects/{project}/feature-costs/gen", json={"cost_minor": COST},
                  headers=headers).raise_for_status()
        wallet = setup.post(f"/api/v1/projects/{project}/wallets", json={"owner_kind": "subject", "owner_ref": "race"},
                            headers=headers).json()["id"]
        setup.post(f"/api/v1/projects/{project}/wallets/{wallet}/grants", json={"amount_minor": GRANTED},
                   headers={**headers, "Idempotency-Key": "grant-1"}).raise_for_status()
        requests = [f"check-{i}" for i in range(CONCURRENT) for _ in range(2)]  # every check sent twice at once
        local = threading.local()

        def send_one(key: str) -> tuple[str, int, dict[str, Any]]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base_url, timeout=60)
            r = local.client.post(f"/api/v1/projects/{project}/access/check",
                                  json={"subject": "race", "feature_key": "gen", "charge": True},
                                  headers={**headers, "Idempotency-Key": key})
            return key, r.status_code, r.json()

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(send_one, requests, timeout=300))
        elapsed = time.monotonic() - started

        by_key: dict[str, set[str]] = {}
        allowed: set[str] = set()
        for key, status, body in results:
            assert status == 200, body
            by_key.setdefault(key, set()).add(body["decision_id"])
            if body["allowed"]:
                assert body["charged"] and body["balance_after_minor"] >= 0
                allowed.add(key)
            else:
                assert body["reason"] == "insufficient_credits"
        assert all(len(ids) == 1 for ids in by_key.values())  # both twins got the same decision
        assert len(allowed) == GRANTED // COST  # 142 fit, 58 are denied: the wallet is used up exactly
        final = setup.get(f"/api/v1/projects/{project}/wallets/{wallet}", headers=headers).json()["balance"]
        assert final["balance_minor"] == GRANTED - COST * len(allowed) == GRANTED % COST
        debits = sql(database_url, "SELECT count(*), sum(-amount_minor), min(balance_after_minor) FROM transactions "
                                   "WHERE wallet_id = %s AND kind = 'debit'", wallet)
        assert debits == [(len(allowed), COST * len(allowed), GRANTED % COST)]
        decisions = sql(database_url, "SELECT count(*), count(*) FILTER (WHERE charged), "
                                      "count(DISTINCT transaction_id) FROM access_decisions")
        assert decisions == [(CONCURRENT, len(allowed), len(allowed))]
        print(f"\n{len(requests)} charged checks (200 keys, each twice) in {elapsed:.2f} s "
              f"({len(requests) / elapsed:.0f}/s over HTTP, 32 clients)")
        assert orjson.dumps(final)
