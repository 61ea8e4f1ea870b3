"""Wallets over HTTP against the real PostgreSQL ledger: creation and visibility, roles on money routes,
debits by amount and by feature cost, idempotency (replay, conflict, failures not stored), reservations
(commit, void, timeout), refunds (partial, twice with one key, never more than charged), burn order and debt
settlement as seen through the API, and the audit trail of money operations."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tenancy_testkit import Team, api_client, create_project, five_users, money, signup, sql, team

from ledger.checkpoints import apply_checkpoints
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.db import make_engine
from ledger.settle import settle_all

pytestmark = pytest.mark.integration


def _wallets(project_id: str) -> str:
    return f"/api/v1/projects/{project_id}/wallets"


def _project_wallet(client: TestClient, t: Team) -> str:
    r = client.post(_wallets(t.project_id), json={"owner_kind": "project"}, headers=t.by_role["owner"].headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _grant(client: TestClient, t: Team, wallet_id: str, amount: int, **extra: Any) -> dict[str, Any]:
    r = money(client, f"{_wallets(t.project_id)}/{wallet_id}/grants", {"amount_minor": amount, **extra},
              t.by_role["admin"].headers)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _balance(client: TestClient, t: Team, wallet_id: str) -> dict[str, Any]:
    r = client.get(f"{_wallets(t.project_id)}/{wallet_id}", headers=t.by_role["viewer"].headers)
    assert r.status_code == 200, r.text
    return r.json()["balance"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ wallets


def test_wallet_creation_listing_and_visibility(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"].headers
        base = _wallets(t.project_id)
        member_wallet = client.post(base, json={"owner_kind": "user", "owner_ref": users["member"].user_id},
                                    headers=owner)
        assert member_wallet.status_code == 201
        again = client.post(base, json={"owner_kind": "user", "owner_ref": users["member"].user_id}, headers=owner)
        assert again.status_code == 200 and again.json()["id"] == member_wallet.json()["id"]
        outsider = client.post(base, json={"owner_kind": "user", "owner_ref": users["outsider"].user_id},
                               headers=owner)
        assert outsider.status_code == 422
        project_wallet = _project_wallet(client, t)
        subjects = [client.post(base, json={"owner_kind": "subject", "owner_ref": f"cust-{i}", "floor_minor": -50},
                                headers=owner).json()["id"] for i in range(3)]
        assert _balance(client, t, subjects[0]) == {"balance_minor": 0, "held_minor": 0, "floor_minor": -50,
                                                    "unsettled_minor": 0,
                                                    "available_minor": 50, "debt_minor": 0, "blocked": False}
        listed: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get(base, params=params, headers=users["viewer"].headers).json()
            listed += [w["id"] for w in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert listed == [member_wallet.json()["id"], project_wallet, *subjects]
        only_subjects = client.get(base, params={"owner_kind": "subject"}, headers=owner).json()["items"]
        assert [w["id"] for w in only_subjects] == subjects

        # another project cannot see, read or charge these wallets, even with the right role at home
        stranger = signup(client, "stranger")
        foreign = create_project(client, stranger, "Foreign")
        for path in (f"/api/v1/projects/{foreign}/wallets/{project_wallet}",
                     f"/api/v1/projects/{foreign}/wallets/{project_wallet}/transactions"):
            assert client.get(path, headers=stranger.headers).status_code == 404
        r = money(client, f"/api/v1/projects/{foreign}/wallets/{project_wallet}/debit", {"amount_minor": 1},
                  stranger.headers)
        assert r.status_code == 404
        assert client.get(f"{base}/{project_wallet}", headers=stranger.headers).status_code == 404


def test_subject_wallet_is_the_one_usage_is_charged_to(database_url: str, engines: Any) -> None:
    """A subject wallet made through the API and the wallet stream workers charge for that subject are ONE row:
    the API uses the subject's auto-provisioned id, records the subject key, and adopts a row the ledger
    already created from usage (so credits granted later settle the debt that usage left)."""
    from streams.catalog_model import auto_wallet_id

    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        owner = t.by_role["owner"].headers
        base = _wallets(t.project_id)
        fresh = client.post(base, json={"owner_kind": "subject", "owner_ref": "cust-new"}, headers=owner).json()
        assert fresh["id"] == auto_wallet_id(t.project_id, "cust-new")
        keys = client.get(f"/api/v1/projects/{t.project_id}/subject-keys", headers=owner).json()
        assert [(k["subject"], k["wallet_id"]) for k in keys] == [("cust-new", fresh["id"])]

        # what the ledger does for an unknown subject's first checkpoint: the row knows only its id
        early = auto_wallet_id(t.project_id, "cust-early")
        sql(database_url, "INSERT INTO wallets (id, project_id, owner_kind, owner_ref, balance_minor)"
                          " VALUES (%s, %s, 'subject', %s, -40)", early, t.project_id, early)
        adopted = client.post(base, json={"owner_kind": "subject", "owner_ref": "cust-early"}, headers=owner)
        assert adopted.status_code == 201, adopted.text
        assert (adopted.json()["id"], adopted.json()["owner_ref"]) == (early, "cust-early")
        assert adopted.json()["balance"]["debt_minor"] == 40

        # an explicit subject key wins: the subject's wallet is the one it names
        r = client.put(f"/api/v1/projects/{t.project_id}/subject-keys/cust-mapped", json={"wallet_id": "w-mapped"},
                       headers=owner)
        assert r.status_code == 200, r.text
        mapped = client.post(base, json={"owner_kind": "subject", "owner_ref": "cust-mapped"}, headers=owner).json()
        assert mapped["id"] == "w-mapped"


WALLET_MATRIX: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "", None, "viewer"),
    ("GET", "/buckets", None, "viewer"),
    ("GET", "/transactions", None, "viewer"),
    ("POST", "/debit", {"amount_minor": 1}, "member"),
    ("POST", "/reservations", {"amount_minor": 1, "timeout_s": 60}, "member"),
    ("POST", "/grants", {"amount_minor": 5}, "admin"),
    ("POST", "/adjustments", {"amount_minor": 5, "reason": "matrix"}, "admin"),
    ("PATCH", "", {"floor_minor": 0}, "admin"),
]
RANK = {"viewer": 1, "member": 2, "admin": 3, "owner": 4}


def test_money_routes_by_role(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _project_wallet(client, t)
        _grant(client, t, wallet, 1_000)
        failures = []
        for method, path, body, min_role in WALLET_MATRIX:
            for who, session in users.items():
                headers = {**session.headers, "Idempotency-Key": uuid.uuid4().hex}
                r = client.request(method, f"{_wallets(t.project_id)}/{wallet}{path}", json=body, headers=headers)
                expected = 404 if who == "outsider" else (r.status_code if RANK[who] >= RANK[min_role] else 403)
                if r.status_code != expected or (expected not in (403, 404) and r.status_code >= 400):
                    failures.append((method, path, who, r.status_code, r.text[:100]))
        assert failures == []
        fc = f"/api/v1/projects/{t.project_id}/feature-costs/gen"
        assert client.put(fc, json={"cost_minor": 3}, headers=users["member"].headers).status_code == 403
        assert client.put(fc, json={"cost_minor": 3}, headers=users["admin"].headers).status_code == 200
        assert client.get(f"/api/v1/projects/{t.project_id}/feature-costs", headers=users["viewer"].headers
                          ).json()[0]["cost_minor"] == 3
        assert client.get(f"/api/v1/projects/{t.project_id}/feature-costs", headers=users["outsider"].headers
                          ).status_code == 404


# ------------------------------------------------------------------------------------------ debits


def test_debit_by_amount_and_by_feature_cost(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _project_wallet(client, t)
        base = f"{_wallets(t.project_id)}/{wallet}"
        member = users["member"].headers
        _grant(client, t, wallet, 100)
        client.put(f"/api/v1/projects/{t.project_id}/feature-costs/image_to_image",
                   json={"cost_minor": 7, "description": "img2img"}, headers=users["admin"].headers).raise_for_status()

        r = money(client, f"{base}/debit", {"feature_key": "image_to_image", "quantity": 3, "source_ref": "job-1"},
                  member)
        assert r.status_code == 201, r.text
        tx = r.json()["transaction"]
        assert (tx["kind"], tx["amount_minor"], tx["balance_before_minor"], tx["balance_after_minor"]) == \
            ("debit", -21, 100, 79)
        assert tx["metadata"]["feature_key"] == "image_to_image" and tx["metadata"]["unit_cost_minor"] == 7
        assert r.json()["balance"]["available_minor"] == 79

        # the admin raises the price: the next debit uses the new cost, no deploy
        client.put(f"/api/v1/projects/{t.project_id}/feature-costs/image_to_image", json={"cost_minor": 9},
                   headers=users["admin"].headers).raise_for_status()
        assert money(client, f"{base}/debit", {"feature_key": "image_to_image"}, member
                     ).json()["transaction"]["amount_minor"] == -9
        unknown = money(client, f"{base}/debit", {"feature_key": "nope"}, member)
        assert unknown.status_code == 422 and unknown.json()["code"] == "api.unknown_feature"
        both = money(client, f"{base}/debit", {"feature_key": "image_to_image", "amount_minor": 1}, member)
        assert both.status_code == 422

        # too much: 402 problem with the numbers, and nothing moved
        short = money(client, f"{base}/debit", {"amount_minor": 71}, member)
        assert short.status_code == 402 and short.headers["content-type"].startswith("application/problem+json")
        assert short.json()["code"] == "ledger.insufficient_credits" and short.json()["available_minor"] == 70
        assert _balance(client, t, wallet)["balance_minor"] == 70
        assert money(client, f"{base}/debit", {"amount_minor": 70}, member).status_code == 201
        assert _balance(client, t, wallet)["available_minor"] == 0

        listed = client.get(f"{base}/transactions", headers=users["viewer"].headers).json()["items"]
        assert [(x["kind"], x["amount_minor"], x["balance_after_minor"]) for x in listed] == \
            [("debit", -70, 0), ("debit", -9, 70), ("debit", -21, 79), ("top_up", 100, 100)]
        only_debits = client.get(f"{base}/transactions", params={"kind": "debit", "source_ref": "job-1"},
                                 headers=member).json()["items"]
        assert [x["id"] for x in only_debits] == [tx["id"]]
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert client.get(f"{base}/transactions", params={"since": future}, headers=member).json()["items"] == []


def test_idempotency_replay_conflict_and_failures_not_stored(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _project_wallet(client, t)
        base = f"{_wallets(t.project_id)}/{wallet}"
        member = users["member"].headers
        _grant(client, t, wallet, 50)

        missing = client.post(f"{base}/debit", json={"amount_minor": 5}, headers=member)
        assert missing.status_code == 400 and missing.json()["code"] == "api.idempotency_key_required"

        first = money(client, f"{base}/debit", {"amount_minor": 5}, member, key="job-1")
        replay = money(client, f"{base}/debit", {"amount_minor": 5}, member, key="job-1")
        assert first.status_code == replay.status_code == 201
        assert replay.json() == first.json() and replay.headers["idempotent-replayed"] == "true"
        conflict = money(client, f"{base}/debit", {"amount_minor": 6}, member, key="job-1")
        assert conflict.status_code == 409 and conflict.json()["code"] == "api.idempotency_conflict"
        elsewhere = money(client, f"{base}/reservations", {"amount_minor": 5}, member, key="job-1")
        assert elsewhere.status_code == 409
        assert _balance(client, t, wallet)["balance_minor"] == 45

        # a refused request leaves its key unused: after a top-up the same key goes through, once
        refused = money(client, f"{base}/debit", {"amount_minor": 100}, member, key="job-2")
        assert refused.status_code == 402
        _grant(client, t, wallet, 100)
        ok = money(client, f"{base}/debit", {"amount_minor": 100}, member, key="job-2")
        assert ok.status_code == 201 and ok.headers["idempotent-replayed"] == "false"
        assert money(client, f"{base}/debit", {"amount_minor": 100}, member, key="job-2").json() == ok.json()
        assert _balance(client, t, wallet)["balance_minor"] == 45
        # keys are per project: another project may use "job-1" for its own debit
        other = team(client, users, "Other")
        other_wallet = _project_wallet(client, other)
        _grant(client, other, other_wallet, 10)
        r = money(client, f"{_wallets(other.project_id)}/{other_wallet}/debit", {"amount_minor": 5}, member,
                  key="job-1")
        assert r.status_code == 201 and r.headers["idempotent-replayed"] == "false"
        debits = sql(database_url, "SELECT count(*) FROM transactions WHERE kind = 'debit'")
        assert debits == [(3,)]


# ------------------------------------------------------------------------------------------ reservations


def test_reservation_commit_void_and_timeout(database_url: str, engines: Any) -> None:
    from ledger.db import make_engine
    from ledger.service import expire_holds

    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _project_wallet(client, t)
        base = f"{_wallets(t.project_id)}/{wallet}"
        member = users["member"].headers
        _grant(client, t, wallet, 1_000)

        held = money(client, f"{base}/reservations", {"amount_minor": 300, "timeout_s": 60}, member)
        assert held.status_code == 201
        hold_id = held.json()["hold"]["id"]
        assert held.json()["balance"] == {"balance_minor": 1000, "held_minor": 300, "floor_minor": 0,
                                          "unsettled_minor": 0,
                                          "available_minor": 700, "debt_minor": 0, "blocked": False}
        # the held credits are not available to debits
        assert money(client, f"{base}/debit", {"amount_minor": 701}, member).status_code == 402
        committed = money(client, f"{base}/reservations/{hold_id}/commit", {"amount_minor": 240}, member)
        assert committed.status_code == 200, committed.text
        assert committed.json()["transaction"]["amount_minor"] == -240
        assert committed.json()["balance"]["held_minor"] == 0 and committed.json()["balance"]["balance_minor"] == 760
        again = money(client, f"{base}/reservations/{hold_id}/commit", {"amount_minor": 240}, member)
        assert again.status_code == 409 and again.json()["code"] == "ledger.hold_not_active"
        assert money(client, f"{base}/reservations/{hold_id}/void", None, member).status_code == 409

        second = money(client, f"{base}/reservations", {"amount_minor": 100}, member).json()["hold"]["id"]
        voided = money(client, f"{base}/reservations/{second}/void", None, member)
        assert voided.status_code == 200 and voided.json()["hold"]["status"] == "voided"
        assert voided.json()["balance"]["available_minor"] == 760
        assert money(client, f"{base}/reservations/{second}/commit", {"amount_minor": 1}, member).status_code == 409

        short = money(client, f"{base}/reservations", {"amount_minor": 50, "timeout_s": 1}, member).json()["hold"]
        assert _balance(client, t, wallet)["held_minor"] == 50
        time.sleep(1.3)
        late = money(client, f"{base}/reservations/{short['id']}/commit", {"amount_minor": 50}, member)
        assert late.status_code == 409 and late.json()["ledger_status"] == "expired"
        engine = make_engine(database_url, pool_size=1)  # what the scheduler does every tick
        try:
            with engine.begin() as conn:
                assert expire_holds(conn, now=datetime.now(UTC)) == 1
        finally:
            engine.dispose()
        assert _balance(client, t, wallet) == {"balance_minor": 760, "held_minor": 0, "floor_minor": 0,
                                               "unsettled_minor": 0,
                                               "available_minor": 760, "debt_minor": 0, "blocked": False}
        hold = client.get(f"{base}/reservations/{short['id']}", headers=member).json()
        assert hold["status"] == "expired"


# ------------------------------------------------------------------------------------------ refunds


def test_refunds_partial_twice_with_one_key_and_never_more_than_charged(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _project_wallet(client, t)
        base = f"{_wallets(t.project_id)}/{wallet}"
        member = users["member"].headers
        _grant(client, t, wallet, 100)
        charge = money(client, f"{base}/debit", {"amount_minor": 50}, member).json()["transaction"]
        refund_url = f"{base}/transactions/{charge['id']}/refund"

        too_much = money(client, refund_url, {"amount_minor": 51, "reason": "vendor failed"}, member)
        assert too_much.status_code == 422 and too_much.json()["code"] == "ledger.refund_exceeds_charge"
        part = money(client, refund_url, {"amount_minor": 20, "reason": "partial failure"}, member, key="refund-a")
        same = money(client, refund_url, {"amount_minor": 20, "reason": "partial failure"}, member, key="refund-a")
        assert part.status_code == same.status_code == 201 and same.json() == part.json()
        refund_tx = part.json()["transaction"]
        assert refund_tx["kind"] == "refund" and refund_tx["amount_minor"] == 20
        assert refund_tx["related_transaction_id"] == charge["id"]
        assert money(client, refund_url, {"amount_minor": 31, "reason": "x"}, member).json()["refundable_minor"] == 30
        rest = money(client, refund_url, {"reason": "the rest"}, member)
        assert rest.status_code == 201 and rest.json()["transaction"]["amount_minor"] == 30
        assert money(client, refund_url, {"amount_minor": 1, "reason": "x"}, member).status_code == 422
        assert _balance(client, t, wallet)["balance_minor"] == 100
        # a top-up is not a charge
        top_up_id = client.get(f"{base}/transactions", params={"kind": "top_up"}, headers=member
                               ).json()["items"][0]["id"]
        assert money(client, f"{base}/transactions/{top_up_id}/refund", {"reason": "x"}, member).status_code == 409
        refunds = sql(database_url, "SELECT amount_minor FROM transactions WHERE kind = 'refund' ORDER BY id")
        assert refunds == [(20,), (30,)]


# ------------------------------------------------------------------------------------------ buckets and debt


def test_burn_order_and_debt_settlement_through_the_api(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _project_wallet(client, t)
        base = f"{_wallets(t.project_id)}/{wallet}"
        admin, member = users["admin"].headers, users["member"].headers
        soon = (datetime.now(UTC) + timedelta(days=3)).isoformat()
        later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
        paid = _grant(client, t, wallet, 100, kind="top_up", priority=100)["transaction"]
        promo_late = _grant(client, t, wallet, 40, kind="promo", priority=10, expires_at=later)["transaction"]
        promo_soon = _grant(client, t, wallet, 30, kind="promo", priority=10, expires_at=soon)["transaction"]
        bonus = _grant(client, t, wallet, 20, kind="bonus", priority=5)["transaction"]
        bucket_of = {tx["id"]: tx["allocations"][0]["bucket_id"] for tx in (paid, promo_late, promo_soon, bonus)}

        buckets = client.get(f"{base}/buckets", headers=member).json()
        # burn order: priority 5, then priority 10 soonest expiry first, then the paid top-up
        expected_order = [bucket_of[bonus["id"]], bucket_of[promo_soon["id"]], bucket_of[promo_late["id"]],
                          bucket_of[paid["id"]]]
        assert [b["id"] for b in buckets] == expected_order

        debit = money(client, f"{base}/debit", {"amount_minor": 75}, member).json()["transaction"]
        burned = {a["bucket_id"]: a["amount_minor"] for a in debit["allocations"]}
        assert burned == {bucket_of[bonus["id"]]: -20, bucket_of[promo_soon["id"]]: -30,
                          bucket_of[promo_late["id"]]: -25}
        remaining = {b["id"]: b["remaining_minor"] for b in client.get(f"{base}/buckets", headers=member).json()}
        assert remaining == {bucket_of[promo_late["id"]]: 15, bucket_of[paid["id"]]: 100}

        # an operator claws back more than is left: debt, and the wallet is blocked for new access
        claw = money(client, f"{base}/adjustments", {"amount_minor": -165, "reason": "charge-back ch_1"}, admin)
        assert claw.status_code == 201 and claw.json()["balance"]["debt_minor"] == 50
        assert claw.json()["balance"]["blocked"] is True
        blocked = money(client, f"{base}/debit", {"amount_minor": 1}, member)
        assert blocked.status_code == 402 and blocked.json()["code"] == "ledger.wallet_blocked"
        assert money(client, f"{base}/reservations", {"amount_minor": 1}, member).status_code == 402
        assert money(client, f"{base}/adjustments", {"amount_minor": 5, "reason": ""}, admin).status_code == 422

        # a top-up repays the debt first; only the rest becomes a spendable bucket
        settle = _grant(client, t, wallet, 80)
        allocations = {a["bucket_id"]: a["amount_minor"] for a in settle["transaction"]["allocations"]}
        assert allocations[None] == 50 and sum(allocations.values()) == 80
        assert settle["balance"] == {"balance_minor": 30, "held_minor": 0, "floor_minor": 0,
                                     "unsettled_minor": 0, "available_minor": 30,
                                     "debt_minor": 0, "blocked": False}
        assert money(client, f"{base}/debit", {"amount_minor": 30}, member).status_code == 201

        audit = client.get(f"/api/v1/projects/{t.project_id}/audit-log", params={"action": "wallet.*"},
                           headers=admin).json()["items"]
        assert [e["action"] for e in audit][:4] == ["wallet.debit", "wallet.grant", "wallet.adjust", "wallet.debit"]
        assert audit[2]["after"]["reason"] == "charge-back ch_1" and audit[2]["actor_user_id"] == users["admin"].user_id


def test_unsettled_usage_shows_in_the_balance_and_debits_cannot_spend_it(database_url: str, engines: Any) -> None:
    """Usage settled later (LEDGER_USAGE_SETTLE_INTERVAL_S > 0): applied, it is in the balance the API shows —
    ``unsettled_minor``, taken off ``available_minor`` — and a debit over HTTP cannot spend it; settled, it is a
    usage transaction and the balance says the same thing with ``unsettled_minor`` back at 0."""
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        wallet = _project_wallet(client, t)
        _grant(client, t, wallet, 100)
        counter = CounterValue(key=CounterKey(wallet_id=wallet, project_id=t.project_id, meter_id="tokens",
                                              period_start=datetime(2026, 11, 1, tzinfo=UTC), price_version_id="v1"),
                               units=Decimal(90), price=PriceModel(model="per_unit", unit_price_minor=Decimal("0.4")),
                               aggregation="sum", events=3)
        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.begin() as conn:
                apply_checkpoints(conn, [ChargeCheckpoint(source_topic="usage.events.v1", partition=0, as_of_offset=5,
                                                          counters=[counter], dedupe_keys=[],
                                                          emitted_at=datetime.now(UTC))], settle_later=True)
            assert _balance(client, t, wallet) == {"balance_minor": 100, "held_minor": 0, "floor_minor": 0,
                                                   "unsettled_minor": 36, "available_minor": 64, "debt_minor": 0,
                                                   "blocked": False}
            base = f"{_wallets(t.project_id)}/{wallet}"
            short = money(client, f"{base}/debit", {"amount_minor": 65}, t.by_role["member"].headers)
            assert short.status_code == 402 and short.json()["available_minor"] == 64
            assert money(client, f"{base}/debit", {"amount_minor": 64}, t.by_role["member"].headers).status_code == 201
            settle_all(engine)
        finally:
            engine.dispose()
        after = _balance(client, t, wallet)
        assert (after["balance_minor"], after["unsettled_minor"], after["available_minor"]) == (0, 0, 0)
        usage = client.get(f"{base}/transactions", params={"kind": "usage"},
                           headers=t.by_role["viewer"].headers).json()["items"]
        assert [u["amount_minor"] for u in usage] == [-36]
