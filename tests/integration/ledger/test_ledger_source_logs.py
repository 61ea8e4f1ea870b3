"""A recreated topic starts a new life (ledger/source_logs.py): its small offsets are applied, not taken for
stale; what an earlier life charged is kept and merged, never charged again; dedupe keys carry across lives."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine

from ledger import queries, service
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.source_logs import current_identity, record_created

pytestmark = pytest.mark.integration

TOPIC = "lives.usage.events.v1"
PERIOD = datetime(2026, 12, 1, tzinfo=UTC)
ONE_PER_UNIT = PriceModel(model="per_unit", unit_price_minor=Decimal("1"))


def _checkpoint(source: str, as_of: int, units: str, dedupe: list[int]) -> ChargeCheckpoint:
    key = CounterKey(wallet_id="W", project_id="p1", meter_id="tokens", period_start=PERIOD, price_version_id="v1")
    return ChargeCheckpoint(source_topic=source, partition=0, as_of_offset=as_of, dedupe_keys=dedupe,
                            counters=[CounterValue(key=key, units=Decimal(units), price=ONE_PER_UNIT,
                                                   aggregation="sum", events=1)],
                            emitted_at=datetime.now(UTC))


def _apply(engine: Engine, checkpoint: ChargeCheckpoint) -> str:
    with engine.begin() as conn:
        return service.apply_checkpoint(conn, checkpoint).status


def test_a_recreated_topic_is_charged_from_its_first_offset(engine: Engine, invariants: Callable[[], None]) -> None:
    with engine.begin() as conn:
        assert record_created(conn, [TOPIC]) == {TOPIC: 0}  # first creation: no history, the bare name
        assert current_identity(conn, TOPIC) == TOPIC
        service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref="W", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=1_000, idempotency_key="g")
    assert _apply(engine, _checkpoint(TOPIC, 500, "40", [11, 12])) == "applied"

    with engine.begin() as conn:  # the broker lost its logs; `up` created the topic again
        assert record_created(conn, [TOPIC]) == {TOPIC: 1}
        second_life = current_identity(conn, TOPIC)
    assert second_life == f"{TOPIC}@1"
    # offset 3 of the new life is below the old mark (500) yet new: applied, priced on the merged total
    assert _apply(engine, _checkpoint(second_life, 3, "5", [13])) == "applied"
    assert _apply(engine, _checkpoint(second_life, 3, "5", [13])) == "stale"  # redelivered within the life
    assert _apply(engine, _checkpoint(TOPIC, 400, "1", [])) == "stale"  # the old life stays closed

    with engine.connect() as conn:
        assert queries.get_balance(conn, "W").balance_minor == 1_000 - 45  # type: ignore[union-attr]
        usage = queries.list_transactions(conn, wallet_id="W", kinds=["usage"]).items
        assert sorted(t.amount_minor for t in usage) == [-40, -5]
        seen = queries.dedupe_keys_since(conn, source_topic=second_life, partitions=[0],
                                         since=datetime.now(UTC) - timedelta(hours=1))
        assert seen == {0: {11, 12, 13}}  # an event resent after the recreation is still a duplicate
    with engine.begin() as conn:
        assert record_created(conn, [TOPIC]) == {TOPIC: 2}
        assert current_identity(conn, TOPIC) == f"{TOPIC}@2"
    invariants()


def test_marks_from_before_lives_were_recorded_count_as_history(engine: Engine) -> None:
    """A database upgraded from a version without source_logs: marks under the bare name mean a first life
    existed, so the topic created now is the second one."""
    topic = "legacy.usage.events.v1"
    assert _apply(engine, _checkpoint(topic, 10, "1", [])) == "applied"
    with engine.begin() as conn:
        assert record_created(conn, [topic]) == {topic: 1}
        assert current_identity(conn, topic) == f"{topic}@1"
