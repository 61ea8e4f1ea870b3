"""The money SDK (``meterline.client.MeterlineApi`` / ``AsyncMeterlineApi``) against the real API over HTTP
(uvicorn, real PostgreSQL): typed results, problem+json as typed exceptions, the same calls sync and async,
and a retry after a dropped answer that charges once (a real TCP proxy swallows the first response)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_sdk_client import DroppingProxy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))  # the shared test kits
from tenancy_testkit import live_server, signup

from meterline.client import (
    AsyncMeterlineApi,
    HoldNotActive,
    InsufficientCredits,
    MeterlineApi,
    NotFound,
    ValidationFailed,
    models,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def server(database_url: str, engines: Any) -> Iterator[str]:
    with live_server(database_url, engines) as url:
        yield url


def _project(server: str) -> tuple[str, str, str]:
    """(project, wallet, an admin API key) for a new owner, with a feature price list."""
    with httpx.Client(base_url=server, timeout=30) as http:
        owner = signup(http, "owner").headers
        project = http.post("/api/v1/projects", json={"name": "SDK Co"}, headers=owner).json()["id"]
        base = f"/api/v1/projects/{project}"
        wallet = http.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": "cust-1"},
                           headers=owner).json()["id"]
        key = http.post(f"{base}/api-keys", json={"name": "backend", "scopes": ["admin"]}, headers=owner).json()
        assert http.put(f"{base}/feature-costs/render", json={"cost_minor": 5}, headers=owner).status_code in (200, 201)
        assert http.put(f"{base}/feature-costs/export", json={"cost_minor": 1, "requires_entitlement": "*"},
                        headers=owner).status_code in (200, 201)
        return project, wallet, key["token"]


def test_sync_client_covers_the_money_calls_with_typed_results_and_errors(server: str) -> None:
    project, wallet, key = _project(server)
    with MeterlineApi(server, key, project) as api:
        granted = api.grant(wallet, amount_minor=1_000, kind="top_up", idempotency_key="topup-1")
        assert isinstance(granted, models.Posting) and granted.balance.available_minor == 1_000
        debit = api.debit(wallet, amount_minor=100, source_ref="job-1", idempotency_key="job-1")
        again = api.debit(wallet, amount_minor=100, source_ref="job-1", idempotency_key="job-1")
        assert (debit.outcome, again.transaction.id) == ("created", debit.transaction.id)  # charged once
        assert api.balance(wallet).balance.available_minor == 900

        with pytest.raises(InsufficientCredits) as refused:
            api.debit(wallet, amount_minor=1_000_000)
        assert (refused.value.status, refused.value.code) == (402, "ledger.insufficient_credits")

        hold = api.reserve(wallet, amount_minor=300, timeout_s=60)
        assert (hold.hold.status, hold.balance.held_minor) == ("active", 300)
        committed = api.commit(wallet, hold.hold.id, amount_minor=250)
        assert committed.transaction.amount_minor == -250 and committed.balance.held_minor == 0
        other = api.reserve(wallet, amount_minor=50)
        assert api.void(wallet, other.hold.id).hold.status == "voided"
        with pytest.raises(HoldNotActive):
            api.commit(wallet, other.hold.id, amount_minor=10)

        refund = api.refund(wallet, debit.transaction.id, reason="job failed", amount_minor=40)
        assert refund.transaction.amount_minor == 40 and refund.transaction.related_transaction_id == debit.transaction.id

        allowed = api.check_access(subject="cust-1", feature_key="render", charge=True, idempotency_key="render-1")
        assert isinstance(allowed, models.AccessDecision) and (allowed.allowed, allowed.charged) == (True, True)
        denied = api.check_access(subject="cust-1", feature_key="export")  # a denial is an answer, not an error
        assert (denied.allowed, denied.reason) == (False, "upgrade_required")

        page = api.transactions(wallet, limit=3)
        assert [t.kind for t in page.items] == ["debit", "refund", "reservation_commit"] and page.next_cursor
        rest = api.transactions(wallet, limit=50, cursor=page.next_cursor)
        assert [t.kind for t in rest.items][-2:] == ["debit", "top_up"]
        assert api.balance(wallet).balance.available_minor == 1_000 - 100 - 250 + 40 - 5

        with pytest.raises(NotFound):
            api.wallet("no-such-wallet")
        with pytest.raises(ValidationFailed) as invalid:
            api.refund(wallet, debit.transaction.id, reason="")
        assert invalid.value.code == "api.validation_failed"


def test_async_client_makes_the_same_calls(server: str) -> None:
    project, wallet, key = _project(server)

    async def flow() -> tuple[int, str, bool]:
        async with AsyncMeterlineApi(server, key, project) as api:
            await api.grant(wallet, amount_minor=500, idempotency_key="a-topup")
            hold = await api.reserve(wallet, amount_minor=200)
            await api.void(wallet, hold.hold.id)
            results = await asyncio.gather(*(api.debit(wallet, amount_minor=10, idempotency_key=f"a-{i}")
                                             for i in range(10)))
            assert len({r.transaction.id for r in results}) == 10
            decision = await api.check_access(wallet_id=wallet, feature_key="render")
            page = await api.transactions(wallet, limit=100)
            return (await api.balance(wallet)).balance.available_minor, page.items[-1].kind, decision.allowed

    assert asyncio.run(flow()) == (400, "top_up", True)


def test_a_retry_after_a_lost_answer_charges_once(server: str) -> None:
    project, wallet, key = _project(server)
    with MeterlineApi(server, key, project) as api:
        api.grant(wallet, amount_minor=100, idempotency_key="r-topup")
    proxy = DroppingProxy(int(server.rsplit(":", 1)[1]), drops=1)
    try:
        with MeterlineApi(f"http://127.0.0.1:{proxy.port}", key, project) as api:
            posting = api.debit(wallet, amount_minor=30)  # the first answer is lost; the SDK resends its key
    finally:
        proxy.close()
    assert proxy.dropped == 1
    with MeterlineApi(server, key, project) as api:
        debits = [t for t in api.transactions(wallet).items if t.kind == "debit"]
        assert [t.id for t in debits] == [posting.transaction.id]
        assert api.balance(wallet).balance.available_minor == 70
