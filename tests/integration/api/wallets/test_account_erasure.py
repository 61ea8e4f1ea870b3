"""Account erasure over HTTP and through the real scheduler job: the request closes the wallet at once (debits,
grants and reservations refused with a clear problem, subject keys taken out), a cancel within the grace restores
everything, and after the grace ``erase_accounts`` tombstones the owner, drops the subject keys and forfeits the
balance exactly once (run twice). Roles, the 404 of a foreign project, and the audit trail (without the subject)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from tenancy_testkit import (
    Team,
    api_client,
    create_project,
    five_users,
    money,
    scheduler_round,
    signup,
    sql,
    team,
)

from api.settings import IdempotencySettings
from ledger.db import make_engine
from meterline.scheduler import jobs

pytestmark = pytest.mark.integration

SUBJECT = "alice@example.com"


def _wallets(t: Team) -> str:
    return f"/api/v1/projects/{t.project_id}/wallets"


def _customer(client: TestClient, t: Team, subject: str = SUBJECT, credits: int = 500) -> str:
    r = client.post(_wallets(t), json={"owner_kind": "subject", "owner_ref": subject},
                    headers=t.by_role["admin"].headers)
    assert r.status_code == 201, r.text
    wallet = str(r.json()["id"])
    if credits:
        g = money(client, f"{_wallets(t)}/{wallet}/grants", {"amount_minor": credits}, t.by_role["admin"].headers)
        assert g.status_code == 201, g.text
    return wallet


def _run_scheduler(database_url: str) -> dict[str, int]:
    return scheduler_round(database_url, jobs(IdempotencySettings()))


def _subject_keys(database_url: str, project_id: str) -> list[tuple[Any, ...]]:
    return sql(database_url, "SELECT subject, wallet_id FROM subject_keys WHERE project_id = %s ORDER BY subject",
               project_id)


def test_request_closes_at_once_and_cancel_within_grace_restores(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        wallet = _customer(client, t)
        base = f"{_wallets(t)}/{wallet}"
        for feature, cost in (("ping", 0), ("gen", 5)):
            client.put(f"/api/v1/projects/{t.project_id}/feature-costs/{feature}", json={"cost_minor": cost},
                       headers=t.by_role["admin"].headers).raise_for_status()
        held = money(client, f"{base}/reservations", {"amount_minor": 50}, t.by_role["member"].headers)
        assert held.status_code == 201, held.text
        assert _subject_keys(database_url, t.project_id) == [(SUBJECT, wallet)]

        r = client.post(f"{base}/erasure", json={"reason": "deleted in the app"}, headers=t.by_role["admin"].headers)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending" and r.json()["subject_keys_held"] == 1
        again = client.post(f"{base}/erasure", headers=t.by_role["admin"].headers)
        assert again.status_code == 200 and again.json()["id"] == r.json()["id"]

        # closed at once: a clear problem for debits (every path), reservations and grants; the hold is released
        for path, body in (("debit", {"amount_minor": 1}), ("reservations", {"amount_minor": 1}),
                           ("grants", {"amount_minor": 1})):
            refused = money(client, f"{base}/{path}", body, t.by_role["admin"].headers)
            assert refused.status_code == 409, (path, refused.text)
            problem = refused.json()
            assert problem["code"] == "ledger.wallet_closed" and "cancel the erasure" in problem["detail"]
        read = client.get(base, headers=t.by_role["viewer"].headers).json()
        assert read["closed_at"] is not None and read["balance"]["held_minor"] == 0
        assert _subject_keys(database_url, t.project_id) == []  # usage for the subject: unknown-subject policy
        # the operator's sign-up call for the same subject answers the closed wallet and maps nothing again
        same = client.post(_wallets(t), json={"owner_kind": "subject", "owner_ref": SUBJECT},
                           headers=t.by_role["admin"].headers)
        assert same.status_code == 200 and same.json()["id"] == wallet and same.json()["closed_at"] is not None
        assert _subject_keys(database_url, t.project_id) == []

        # access checks on the closed wallet are denied, free features too, and nothing is charged
        for target, feature in (({"wallet_id": wallet}, "ping"), ({"wallet_id": wallet}, "gen"),
                                ({"subject": SUBJECT}, "gen")):  # by subject: its deterministic id is this wallet
            check = money(client, f"/api/v1/projects/{t.project_id}/access/check",
                          {**target, "feature_key": feature, "charge": True}, t.by_role["member"].headers)
            assert check.status_code == 200, check.text
            assert (check.json()["allowed"], check.json()["reason"], check.json()["charged"]) == \
                (False, "wallet_closed", False)
        assert read["balance"]["balance_minor"] == client.get(base, headers=t.by_role["viewer"].headers).json()[
            "balance"]["balance_minor"]

        # the job leaves a request inside its grace alone
        assert _run_scheduler(database_url)["erase_accounts"] == 0

        cancelled = client.post(f"{base}/erasure/cancel", headers=t.by_role["admin"].headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert _subject_keys(database_url, t.project_id) == [(SUBJECT, wallet)]
        assert client.get(base, headers=t.by_role["viewer"].headers).json()["closed_at"] is None
        ok = money(client, f"{base}/debit", {"amount_minor": 5}, t.by_role["member"].headers)
        assert ok.status_code == 201, ok.text
        reopened = money(client, f"/api/v1/projects/{t.project_id}/access/check",
                         {"wallet_id": wallet, "feature_key": "gen", "charge": True}, t.by_role["member"].headers)
        assert (reopened.json()["allowed"], reopened.json()["charged"]) == (True, True), reopened.text
        assert client.post(f"{base}/erasure/cancel", headers=t.by_role["admin"].headers).status_code == 404
        # a new request after a cancel is a new request
        renewed = client.post(f"{base}/erasure", headers=t.by_role["admin"].headers)
        assert renewed.status_code == 202 and renewed.json()["id"] != r.json()["id"]

        actions = [e["action"] for e in client.get(f"/api/v1/projects/{t.project_id}/audit-log",
                                                   params={"action": "wallet.erasure*"},
                                                   headers=t.by_role["owner"].headers).json()["items"]]
        assert actions == ["wallet.erasure_request", "wallet.erasure_cancel", "wallet.erasure_request"]


def test_after_the_grace_the_job_erases_once_and_forfeits_the_balance(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines, erasure_grace_s=0) as client:
        t = team(client, five_users(client))
        wallet = _customer(client, t, credits=500)
        other = _customer(client, t, subject="bob", credits=70)
        base = f"{_wallets(t)}/{wallet}"
        assert money(client, f"{base}/debit", {"amount_minor": 120}, t.by_role["member"].headers).status_code == 201
        assert client.post(f"{base}/erasure", headers=t.by_role["admin"].headers).status_code == 202

        first = _run_scheduler(database_url)
        second = _run_scheduler(database_url)
        assert (first["erase_accounts"], second["erase_accounts"]) == (1, 0)

        erased = client.get(f"{base}/erasure", headers=t.by_role["viewer"].headers).json()
        assert erased["status"] == "erased" and erased["forfeited_minor"] == 380
        assert erased["subject_keys_held"] == 0
        read = client.get(base, headers=t.by_role["viewer"].headers).json()
        assert read["owner_ref"].startswith("erased_") and SUBJECT not in read["owner_ref"]
        assert read["balance"]["balance_minor"] == 0 and read["closed_at"] is not None
        assert _subject_keys(database_url, t.project_id) == [("bob", other)]  # only the erased subject's key went
        assert sql(database_url, "SELECT count(*) FROM wallets WHERE owner_ref = %s", SUBJECT) == [(0,)]

        # transactions stay; the forfeiture is one adjustment with its reason
        txs = client.get(f"{base}/transactions", headers=t.by_role["viewer"].headers).json()["items"]
        assert [(x["kind"], x["amount_minor"]) for x in txs] == [("adjustment", -380), ("debit", -120),
                                                               ("top_up", 500)]
        assert txs[0]["id"] == erased["forfeit_transaction_id"] and "forfeited" in txs[0]["reason"]
        assert txs[0]["idempotency_key"] == f"erasure:{t.project_id}:{wallet}"

        # even a forced re-run of the erasure for this wallet cannot forfeit twice (ledger key)
        from api.wallets.erasure import FORFEIT_REASON
        from ledger import service

        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.begin() as conn:
                replay = service.forfeit_balance(conn, wallet_id=wallet, idempotency_key=f"erasure:{t.project_id}:"
                                                 f"{wallet}", reason=FORFEIT_REASON)
        finally:
            engine.dispose()
        assert replay is not None and replay.outcome == "duplicate"
        assert sql(database_url, "SELECT count(*) FROM transactions WHERE wallet_id = %s AND kind = 'adjustment'",
                   wallet) == [(1,)]

        # erased is final: no cancel, no debit, no grant
        late = client.post(f"{base}/erasure/cancel", headers=t.by_role["admin"].headers)
        assert late.status_code == 409 and "cannot be undone" in late.json()["detail"]
        assert money(client, f"{base}/grants", {"amount_minor": 1}, t.by_role["admin"].headers).status_code == 409

        entries = client.get(f"/api/v1/projects/{t.project_id}/audit-log", params={"target_id": wallet},
                             headers=t.by_role["owner"].headers).json()["items"]
        erase = [e for e in entries if e["action"] == "wallet.erase"]
        assert len(erase) == 1 and erase[0]["actor_kind"] == "system"
        assert erase[0]["after"]["forfeited_minor"] == 380
        for e in entries:
            if e["action"].startswith("wallet.eras"):
                assert SUBJECT not in str(e), e


def test_cancel_after_the_grace_roles_and_foreign_projects(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines, erasure_grace_s=0) as client:
        users = five_users(client)
        t = team(client, users)
        wallet = _customer(client, t, credits=0)
        base = f"{_wallets(t)}/{wallet}/erasure"
        for role in ("viewer", "member"):
            assert client.post(base, headers=users[role].headers).status_code == 403
        assert client.post(base, headers=users["outsider"].headers).status_code == 404
        stranger = signup(client, "stranger")
        foreign = create_project(client, stranger, "Foreign")
        assert client.post(f"/api/v1/projects/{foreign}/wallets/{wallet}/erasure",
                           headers=stranger.headers).status_code == 404
        assert client.get(base, headers=users["viewer"].headers).status_code == 404  # nothing requested yet

        project_wallet = client.post(_wallets(t), json={"owner_kind": "project"}, headers=users["owner"].headers)
        r = client.post(f"{_wallets(t)}/{project_wallet.json()['id']}/erasure", headers=users["admin"].headers)
        assert r.status_code == 422 and "subject" in r.json()["detail"]

        assert client.post(base, headers=users["admin"].headers).status_code == 202
        for role in ("viewer", "member"):
            assert client.post(f"{base}/cancel", headers=users[role].headers).status_code == 403
        late = client.post(f"{base}/cancel", headers=users["admin"].headers)  # grace 0: already over
        assert late.status_code == 409 and "grace period is over" in late.json()["detail"]
        assert _run_scheduler(database_url)["erase_accounts"] == 1
        erased = client.get(base, headers=users["viewer"].headers).json()
        assert erased["status"] == "erased" and erased["forfeited_minor"] == 0
        assert erased["forfeit_transaction_id"] is None
