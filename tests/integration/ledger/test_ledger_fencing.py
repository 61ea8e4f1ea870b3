"""Fencing (DESIGN §2 invariant 11, issue 13 items 7 and 8): one owner per source partition.

The handover of issue 13 item 7, step by step on the real PostgreSQL: the previous owner's last checkpoint is
acknowledged by the broker but not yet applied when the new owner seeds; a subject key was mapped in between,
so the new owner meters the same offsets onto another wallet. On cbf7ba4 both checkpoints applied: 300 units on
each of two wallets. With owner epochs exactly one owner charges them."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine

from ledger import queries
from ledger.checkpoints import apply_checkpoint
from ledger.consumer import check_startup
from ledger.contracts import TOPIC_LEDGER_CHARGES, ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.fencing import ChargesTopicRepartitioned, check_charges_partitions, take_owner_epoch
from ledger.settings import LedgerSettings

pytestmark = pytest.mark.integration

SOURCE = "usage.events.v1"
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("1"))


def _checkpoint(as_of: int, wallet: str, units: int, *, epoch: int) -> ChargeCheckpoint:
    return ChargeCheckpoint(
        source_topic=SOURCE, partition=3, as_of_offset=as_of, emitted_at=datetime.now(UTC), owner_epoch=epoch,
        counters=[CounterValue(key=CounterKey(wallet_id=wallet, project_id="p1", meter_id="tokens",
                                              period_start=PERIOD, price_version_id="v1"),
                               units=Decimal(units), price=PRICE, events=units)])


def _balance(conn: Any, wallet: str) -> int:
    view = queries.get_balance(conn, wallet)
    return view.balance_minor if view else 0


def test_a_handover_with_a_catalog_change_charges_the_offsets_once(engine: Engine,
                                                                  invariants: Callable[..., None]) -> None:
    with engine.begin() as conn:  # the previous owner seeds partition 3
        old_epoch = take_owner_epoch(conn, SOURCE, 3)
    # it meters offsets 0..99 (300 tokens of subject s, whose wallet is the auto-provisioned one) and emits;
    # the broker acknowledges it, the ledger has not applied it yet, faust has not committed the offsets
    old = _checkpoint(99, "w-auto", 300, epoch=old_epoch)
    # an operator maps s to wallet w-mapped; the partition moves to a new owner, whose seeding wait passes
    # (committed offset 0 → nothing to wait for) and which takes its epoch, then seeds from applied_through −1
    with engine.begin() as conn:
        new_epoch = take_owner_epoch(conn, SOURCE, 3)
    with engine.connect() as conn:
        assert queries.applied_offsets(conn, SOURCE, [3]) == {3: -1}
    # the new owner meters the same offsets again, under the new mapping, plus one more event
    new = _checkpoint(100, "w-mapped", 301, epoch=new_epoch)
    with engine.begin() as conn:  # the ledger now applies them in the charges topic's order
        first = apply_checkpoint(conn, old)
        second = apply_checkpoint(conn, new)
    assert (first.status, second.status) == ("stale", "applied")  # the old owner's is fenced: a no-op
    with engine.connect() as conn:
        assert (_balance(conn, "w-auto"), _balance(conn, "w-mapped")) == (0, -301)
    with engine.begin() as conn:  # and it stays fenced when redelivered later
        assert apply_checkpoint(conn, old).status == "stale"
    invariants()


def test_the_epoch_only_grows_and_an_owner_two_handovers_ago_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        epochs = [take_owner_epoch(conn, SOURCE, 3) for _ in range(3)]
    assert epochs == [1, 2, 3]
    with engine.begin() as conn:
        assert apply_checkpoint(conn, _checkpoint(10, "w", 5, epoch=3)).status == "applied"
        assert apply_checkpoint(conn, _checkpoint(20, "w", 9, epoch=1)).status == "stale"
        assert apply_checkpoint(conn, _checkpoint(20, "w", 7, epoch=0)).status == "stale"  # pre-fencing worker
        assert _balance(conn, "w") == -5


def test_start_up_refuses_a_repartitioned_charges_topic(database_url: str, topics: Any) -> None:
    settings = LedgerSettings.model_validate({
        "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
        "METERLINE_TOPIC_PREFIX": topics.prefix, "consumer_group": f"ledger-{uuid.uuid4().hex[:8]}"})
    check_startup(settings)  # first use records the count (2 in the test topics)
    check_startup(settings)  # same count: fine
    from sqlalchemy import text

    from ledger.db import make_engine
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT partitions FROM topic_partitions WHERE topic = :t"),
                                {"t": topics.name(TOPIC_LEDGER_CHARGES)}).scalar() == 2
            # what a re-partitioned topic looks like to the consumer: the live count differs from the record
            conn.execute(text("UPDATE topic_partitions SET partitions = 3 WHERE topic = :t"),
                         {"t": topics.name(TOPIC_LEDGER_CHARGES)})
    finally:
        engine.dispose()
    with pytest.raises(ChargesTopicRepartitioned, match="re-partitioning"):
        check_startup(settings)


def test_two_consumers_starting_at_once_record_the_charges_topic_once(engine: Engine) -> None:
    """The second start waits on the first's uncommitted row; once it commits, the second must read it back (its
    statement's snapshot predates the row) instead of refusing a "re-partitioned" topic (a race CI found when two
    ledger consumers started together)."""
    topic = f"t{uuid.uuid4().hex[:8]}.ledger.charges.v1"
    outcome: list[object] = []
    with engine.connect() as first:
        first.begin()
        assert check_charges_partitions(first, topic, 4) == 4  # recorded, not yet committed

        def second_start() -> None:
            try:
                with engine.begin() as second:
                    outcome.append(check_charges_partitions(second, topic, 4))
            except Exception as exc:  # the assertion below shows what went wrong
                outcome.append(exc)

        thread = threading.Thread(target=second_start)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the second start should wait on the first's uncommitted row"
        first.commit()
        thread.join(timeout=30)
    assert outcome == [4]
