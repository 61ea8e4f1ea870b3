"""Group commit of debits (api/wallets/debit_batch.py) over real HTTP and the real PostgreSQL: concurrent debits share
transactions, yet every money invariant holds as for one debit per transaction — never below the floor,
exactly once per Idempotency-Key (twins in flight at once, a key raced on two wallets), a 402 stores
nothing, one audit row and one record per posting, and each wallet's balance chain is unbroken."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from tenancy_testkit import live_server, owner_and_project, sql

pytestmark = pytest.mark.integration

GRANTED = 3_000
FLOOR = 100


def test_concurrent_debits_share_transactions_and_stay_exact(database_url: str, engines: Any) -> None:
    with live_server(database_url, engines, rate_limit_per_s=0) as base_url, \
            httpx.Client(base_url=base_url, timeout=30) as setup:
        headers, project = owner_and_project(setup, "Batch")
        token = setup.post(f"/api/v1/projects/{project}/api-keys", json={"name": "k", "scopes": ["admin"]},
                           headers=headers).json()["token"]
        key_headers = {"Authorization": f"Bearer {token}"}
        wallets = f"/api/v1/projects/{project}/wallets"
        a = setup.post(wallets, json={"owner_kind": "project", "floor_minor": FLOOR}, headers=headers).json()["id"]
        b = setup.post(wallets, json={"owner_kind": "subject", "owner_ref": "c-b"}, headers=headers).json()["id"]
        for w in (a, b):
            setup.post(f"{wallets}/{w}/grants", json={"amount_minor": GRANTED},
                       headers={**headers, "Idempotency-Key": f"grant-{w}"}).raise_for_status()

        rng = random.Random(7)
        amounts = {f"d-{i}": rng.randint(1, 10) for i in range(500)}
        # every key twice at once on wallet a (twins); some keys also on wallet b (a racing reuse: one wins)
        raced = {f"d-{i}" for i in range(0, 500, 25)}
        requests = [(a, k, amt, key_headers) for k, amt in amounts.items() for _ in range(2)]
        requests += [(b, k, amounts[k], key_headers) for k in raced]
        requests += [(a, f"u-{i}", 1, headers) for i in range(40)]  # a user's debits take the same path
        rng.shuffle(requests)
        local = threading.local()

        def send(item: tuple[str, str, int, dict[str, str]]) -> tuple[str, str, int, dict[str, Any]]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base_url, timeout=60)
            wallet, key, amount, auth = item
            r = local.client.post(f"{wallets}/{wallet}/debit", json={"amount_minor": amount},
                                  headers={**auth, "Idempotency-Key": key})
            return wallet, key, r.status_code, r.json()

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(send, requests, timeout=300))

    posted: dict[str, set[tuple[str, int]]] = {}
    for wallet, key, status, body in results:
        assert status in (201, 402, 409), (status, body)
        if status == 409:
            assert key in raced and body["code"] == "api.idempotency_conflict", body
        if status == 402:
            assert body["code"] == "ledger.insufficient_credits"
        if status == 201:
            assert body["transaction"]["wallet_id"] == wallet
            posted.setdefault(key, set()).add((wallet, body["transaction"]["id"]))
    assert all(len(v) == 1 for v in posted.values()), "a key posted twice"
    charged = {w: sum((amounts.get(k, 1) for k, v in posted.items() for pw, _ in v if pw == w), 0) for w in (a, b)}
    for w in (a, b):
        balance, held = sql(database_url, "SELECT balance_minor, held_minor FROM wallets WHERE id = %s", w)[0]
        assert (balance, held) == (GRANTED - charged[w], 0)
        chain = sql(database_url, "SELECT balance_before_minor, balance_after_minor FROM transactions "
                                  "WHERE wallet_id = %s ORDER BY id", w)
        assert all(chain[i][0] == chain[i - 1][1] for i in range(1, len(chain)))
    assert sql(database_url, "SELECT min(balance_after_minor) FROM transactions WHERE wallet_id = %s", a)[0][0] \
        >= FLOOR
    # refusals were refusals: nothing refused on wallet a would have fit at the end, and they stored nothing
    available_a = GRANTED - charged[a] - FLOOR
    refused = {k for w, k, s, _ in results if w == a and s == 402} - set(posted)
    assert all(amounts.get(k, 1) > available_a for k in refused)
    debit_rows = len(posted)
    assert sql(database_url, "SELECT count(*) FROM idempotency_records WHERE project_id = %s", project) == \
        [(2 + debit_rows,)]
    assert sql(database_url, "SELECT count(*) FROM audit_log WHERE project_id = %s AND action = 'wallet.debit'",
               project) == [(debit_rows,)]
    assert sql(database_url, "SELECT count(*) FROM outbox o JOIN transactions t ON t.id = "
                             "(convert_from(o.payload, 'UTF8')::jsonb ->> 'transaction_id')::bigint "
                             "WHERE t.kind = 'debit' AND t.project_id = %s", project) == [(debit_rows,)]
    # several debits committed together (one transaction = one now())
    (rows, transactions), = sql(database_url, "SELECT count(*), count(DISTINCT created_at) FROM transactions "
                                              "WHERE project_id = %s AND kind = 'debit'", project)
    assert rows == debit_rows and transactions < rows


def test_a_batch_that_fails_at_commit_runs_its_debits_alone(database_url: str, engines: Any) -> None:
    """A racing request holds the key's record uncommitted: the batch's record insert waits for it, then fails
    the UNIQUE record at commit. The whole batch rolls back and each debit runs alone: 409 for the raced key,
    the others post once."""
    import time

    import psycopg

    from ledger.db import libpq_url

    with live_server(database_url, engines, rate_limit_per_s=0) as base_url, \
            httpx.Client(base_url=base_url, timeout=30) as setup:
        headers, project = owner_and_project(setup, "Race")
        wallets = f"/api/v1/projects/{project}/wallets"
        a = setup.post(wallets, json={"owner_kind": "project"}, headers=headers).json()["id"]
        setup.post(f"{wallets}/{a}/grants", json={"amount_minor": 100},
                   headers={**headers, "Idempotency-Key": "grant"}).raise_for_status()

        with psycopg.connect(libpq_url(database_url)) as racer:
            racer.execute("INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, "
                          "status_code, response_body) VALUES (%s, 'raced', 'another request', 201, '{}')", (project,))

            def send(key: str) -> httpx.Response:
                with httpx.Client(base_url=base_url, timeout=30) as c:
                    return c.post(f"{wallets}/{a}/debit", json={"amount_minor": 3},
                                  headers={**headers, "Idempotency-Key": key})

            with ThreadPoolExecutor(max_workers=8) as pool:
                raced = pool.submit(send, "raced")
                time.sleep(0.3)
                others = [pool.submit(send, f"other-{i}") for i in range(6)]
                time.sleep(0.5)
                racer.commit()
                r = raced.result(timeout=30)
                done = [f.result(timeout=30) for f in others]

    assert r.status_code == 409 and r.json()["code"] == "api.idempotency_conflict", r.text
    assert [d.status_code for d in done] == [201] * 6, [d.text for d in done]
    assert sql(database_url, "SELECT balance_minor FROM wallets WHERE id = %s", a) == [(100 - 6 * 3,)]
    assert sql(database_url, "SELECT count(*) FROM transactions WHERE wallet_id = %s AND kind = 'debit'", a) == [(6,)]
    assert sql(database_url, "SELECT count(*) FROM audit_log WHERE project_id = %s AND action = 'wallet.debit'",
               project) == [(6,)]


def test_a_batch_connection_the_database_dropped_is_replaced_and_loses_nothing(
        database_url: str, engines: Any) -> None:
    """The batcher keeps its connections between batches without a ping: when the server ends one (a restart, an
    idle timeout, an operator), the batch on it fails, its debits run alone and post once, and the next batch opens
    a fresh connection."""
    from api.wallets.debit_batch import BATCH_APPLICATION_NAME

    def batch_backends() -> list[int]:
        return [pid for (pid,) in sql(database_url, "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                      BATCH_APPLICATION_NAME)]

    with live_server(database_url, engines, rate_limit_per_s=0) as base_url, \
            httpx.Client(base_url=base_url, timeout=30) as client:
        headers, project = owner_and_project(client, "Dropped")
        wallets = f"/api/v1/projects/{project}/wallets"
        a = client.post(wallets, json={"owner_kind": "project"}, headers=headers).json()["id"]
        client.post(f"{wallets}/{a}/grants", json={"amount_minor": 1_000},
                    headers={**headers, "Idempotency-Key": "grant"}).raise_for_status()

        def debit(key: str) -> httpx.Response:
            return client.post(f"{wallets}/{a}/debit", json={"amount_minor": 7},
                               headers={**headers, "Idempotency-Key": key})

        assert debit("before").status_code == 201
        dropped = batch_backends()
        assert dropped, "the batch ran on a connection of its own"
        sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            BATCH_APPLICATION_NAME)
        after = [debit(f"after-{i}") for i in range(5)]
        again = debit("after-0")  # a retry of a debit that ran alone is a replay, not a second charge
        fresh = batch_backends()

    assert [r.status_code for r in after] == [201] * 5, [r.text for r in after]
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["transaction"]["id"] == after[0].json()["transaction"]["id"]
    assert sql(database_url, "SELECT balance_minor FROM wallets WHERE id = %s", a) == [(1_000 - 6 * 7,)]
    assert sql(database_url, "SELECT count(*) FROM transactions WHERE wallet_id = %s AND kind = 'debit'", a) == [(6,)]
    assert fresh and not set(fresh) & set(dropped)
