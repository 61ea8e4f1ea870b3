"""A closed wallet (account erasure requested) against the real PostgreSQL ledger: new debits, reservations,
grants, refunds and owed fees are refused under the lock; usage that already happened still posts through
checkpoints exactly once; the forfeiture of the balance posts once per key; reopening restores access."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine

from ledger import queries, service
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.errors import InvalidRequest, WalletBlocked, WalletClosed

pytestmark = pytest.mark.integration

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)


def _checkpoint(as_of: int, units: str) -> ChargeCheckpoint:
    value = CounterValue(key=CounterKey(wallet_id="W", project_id="p1", meter_id="tokens", period_start=PERIOD,
                                        price_version_id="v1"),
                         units=Decimal(units), price=PriceModel(model="per_unit", unit_price_minor=Decimal("1")),
                         aggregation="sum", latest_at=None, events=1)
    return ChargeCheckpoint(source_topic="usage.events.v1", partition=0, as_of_offset=as_of, counters=[value],
                            dedupe_keys=[], emitted_at=datetime.now(UTC))


def test_closed_wallet_refuses_new_money_but_posts_usage_once(engine: Engine, invariants: Callable[[], None]) -> None:
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref="cust-1", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=100, idempotency_key="g1")
        charge = service.debit(conn, wallet_id="W", amount_minor=10, idempotency_key="d1")
        hold = service.reserve(conn, wallet_id="W", amount_minor=20, timeout_s=600, idempotency_key="r1")
    with engine.begin() as conn:
        closed = service.close_wallet(conn, wallet_id="W")
        assert closed.closed_at is not None and closed.held_minor == 0  # the active hold was voided
        assert queries.get_hold(conn, hold.id).status == "voided"  # type: ignore[union-attr]

    refusals: list[Callable[..., object]] = [
        lambda c: service.debit(c, wallet_id="W", amount_minor=1, idempotency_key="d2"),
        lambda c: service.reserve(c, wallet_id="W", amount_minor=1, timeout_s=60, idempotency_key="r2"),
        lambda c: service.grant_credits(c, wallet_id="W", amount_minor=5, idempotency_key="g2"),
        lambda c: service.refund(c, transaction_id=charge.transaction.id, idempotency_key="f1"),
        lambda c: service.charge_owed(c, wallet_id="W", amount_minor=5, idempotency_key="o1"),
    ]
    for refuse in refusals:
        with engine.begin() as conn, pytest.raises(WalletClosed, match="closed") as caught:
            refuse(conn)
        assert isinstance(caught.value, WalletBlocked) and caught.value.code == "ledger.wallet_closed"

    # usage that happened is posted anyway, once (a replayed checkpoint is stale)
    with engine.begin() as conn:
        assert service.apply_checkpoint(conn, _checkpoint(5, "7")).status == "applied"
    with engine.begin() as conn:
        assert service.apply_checkpoint(conn, _checkpoint(5, "7")).status != "applied"
    with engine.connect() as conn:
        assert queries.get_balance(conn, "W").balance_minor == 100 - 10 - 7  # type: ignore[union-attr]

    # the forfeiture: only on a closed wallet, once per key, the whole positive balance, as an adjustment
    with engine.begin() as conn:
        first = service.forfeit_balance(conn, wallet_id="W", idempotency_key="erasure:W", reason="erased")
    with engine.begin() as conn:
        again = service.forfeit_balance(conn, wallet_id="W", idempotency_key="erasure:W", reason="erased")
    assert first is not None and again is not None
    assert (first.outcome, first.transaction.kind, first.transaction.amount_minor) == ("created", "adjustment", -83)
    assert first.transaction.reason == "erased" and first.transaction.balance_after_minor == 0
    assert (again.outcome, again.transaction.id) == ("duplicate", first.transaction.id)
    with engine.begin() as conn:  # nothing left: nothing posted under a new key either
        assert service.forfeit_balance(conn, wallet_id="W", idempotency_key="erasure:W:2", reason="erased") is None

    with engine.begin() as conn:
        service.reopen_wallet(conn, wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=5, idempotency_key="g3")
        service.debit(conn, wallet_id="W", amount_minor=5, idempotency_key="d3")
        with pytest.raises(InvalidRequest, match="open"):
            service.forfeit_balance(conn, wallet_id="W", idempotency_key="erasure:W:3", reason="erased")
    invariants()
