"""Concurrency over real HTTP (uvicorn on 127.0.0.1, the real PostgreSQL): 1,000 concurrent debits on one
wallet — each sent twice at once with the same Idempotency-Key — never go below the floor, post exactly once
per key, and the sum is exact. Also API-key principals on money routes (scopes, foreign projects)."""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from tenancy_testkit import (
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

pytestmark = pytest.mark.integration

DEBITS = 1_000
GRANTED = 5_000


def test_1000_concurrent_debits_with_duplicate_twins_never_overspend(database_url: str, engines: Any) -> None:
    with live_server(database_url, engines, rate_limit_per_s=0) as base_url, \
            httpx.Client(base_url=base_url, timeout=30) as setup:
        headers, project = owner_and_project(setup, "Race")
        wallets = f"/api/v1/projects/{project}/wallets"
        wallet = setup.post(wallets, json={"owner_kind": "project", "floor_minor": 0}, headers=headers).json()["id"]
        setup.post(f"{wallets}/{wallet}/grants", json={"amount_minor": GRANTED},
                   headers={**headers, "Idempotency-Key": "grant-1"}).raise_for_status()

        rng = random.Random(20260101)
        amounts = {f"debit-{i}": rng.randint(1, 10) for i in range(DEBITS)}
        requests = [(key, amount) for key, amount in amounts.items() for _ in range(2)]  # every request twice
        rng.shuffle(requests)
        local = __import__("threading").local()

        def send(item: tuple[str, int]) -> tuple[str, int, int, dict[str, Any]]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base_url, timeout=60)
            key, amount = item
            r = local.client.post(f"{wallets}/{wallet}/debit", json={"amount_minor": amount},
                                  headers={**headers, "Idempotency-Key": key})
            return key, amount, r.status_code, r.json()

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(send, requests, timeout=300))
        elapsed = time.monotonic() - started
        assert elapsed < 300

        by_key: dict[str, set[int]] = {}
        tx_by_key: dict[str, set[int]] = {}
        for key, _amount, status, body in results:
            assert status in (201, 402), (status, body)
            if status == 402:
                assert body["code"] == "ledger.insufficient_credits"
            by_key.setdefault(key, set()).add(status)
            if status == 201:
                tx_by_key.setdefault(key, set()).add(body["transaction"]["id"])
        # both twins of a key saw the same outcome (or the second one was a refusal left retryable: a 402
        # stores nothing, so a twin arriving after it may still be refused) and at most one transaction each
        assert all(len(ids) == 1 for ids in tx_by_key.values())
        charged = sum(amounts[k] for k in tx_by_key)

        final = setup.get(f"{wallets}/{wallet}", headers=headers).json()["balance"]
        assert final["balance_minor"] == GRANTED - charged
        assert final["balance_minor"] >= 0 and final["held_minor"] == 0
        rows = sql(database_url, "SELECT count(*), coalesce(sum(-amount_minor), 0), min(balance_after_minor) "
                                 "FROM transactions WHERE wallet_id = %s AND kind = 'debit'", wallet)
        assert rows == [(len(tx_by_key), charged, rows[0][2])] and rows[0][2] >= 0
        # the refused ones were refused for a reason: nothing that was refused would have fit at the end
        refused = [k for k, statuses in by_key.items() if statuses == {402}]
        assert all(amounts[k] > final["available_minor"] for k in refused)
        # the balance chain is unbroken: each transaction starts where the previous one ended
        chain = sql(database_url, "SELECT balance_before_minor, balance_after_minor FROM transactions "
                                  "WHERE wallet_id = %s ORDER BY id", wallet)
        assert all(chain[i][0] == chain[i - 1][1] for i in range(1, len(chain)))
        assert sql(database_url, "SELECT count(*) FROM idempotency_records WHERE project_id = %s", project) == \
            [(1 + len(tx_by_key),)]
        print(f"\n{len(requests)} debit requests in {elapsed:.1f} s ({len(requests) / elapsed:.0f}/s); "
              f"{len(tx_by_key)} posted, {len(refused)} refused, {charged} charged")


def test_api_keys_on_money_routes(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"].headers
        keys = {}
        for scopes in (["ingest"], ["read"], ["admin"]):
            r = client.post(f"/api/v1/projects/{t.project_id}/api-keys", json={"name": "-".join(scopes),
                                                                              "scopes": scopes}, headers=owner)
            assert r.status_code == 201, r.text
            keys[scopes[0]] = {"Authorization": f"Bearer {r.json()['token']}"}
        wallets = f"/api/v1/projects/{t.project_id}/wallets"
        wallet = client.post(wallets, json={"owner_kind": "subject", "owner_ref": "cust-1"}, headers=keys["admin"])
        assert wallet.status_code == 201
        wid = wallet.json()["id"]
        assert money(client, f"{wallets}/{wid}/grants", {"amount_minor": 10}, keys["admin"]).status_code == 201
        assert client.get(f"{wallets}/{wid}", headers=keys["read"]).status_code == 200
        assert client.get(f"{wallets}/{wid}", headers=keys["ingest"]).status_code == 403
        assert money(client, f"{wallets}/{wid}/debit", {"amount_minor": 1}, keys["read"]).status_code == 403
        assert money(client, f"{wallets}/{wid}/debit", {"amount_minor": 1}, keys["ingest"]).status_code == 403
        debit = money(client, f"{wallets}/{wid}/debit", {"amount_minor": 4}, keys["admin"])
        assert debit.status_code == 201
        # a key never reaches another project, and ownership is a person's act
        stranger = signup(client, "stranger")
        foreign = create_project(client, stranger, "Foreign")
        assert client.get(f"/api/v1/projects/{foreign}", headers=keys["admin"]).status_code == 404
        assert client.post(f"/api/v1/projects/{t.project_id}/ownership-transfer",
                           json={"user_id": users["admin"].user_id}, headers=keys["admin"]).status_code == 403
        entry = client.get(f"/api/v1/projects/{t.project_id}/audit-log", params={"action": "wallet.debit"},
                           headers=owner).json()["items"][0]
        assert entry["actor_kind"] == "api_key" and entry["actor_key_id"] is not None
        assert entry["target_id"] == str(debit.json()["transaction"]["id"])
        assert debit.json()["transaction"]["metadata"]["actor_kind"] == "api_key"
        assert uuid.UUID(entry["request_id"])  # the middleware's id when the client sent none
