"""One bad checkpoint never stops the pipeline (DESIGN §2 invariant 8, issue 13 items 2 and 8): on the real
broker and PostgreSQL, a checkpoint the ledger cannot apply — or cannot even decode — halts only its own
lane, is reported (log, ``partition_halts`` row, consumer stats), is never skipped (also across a restart),
and the lane resumes by itself once the cause is gone.

On the old code (cbf7ba4) the first test crash-looped the consumer (``TypeError: Integer exceeds 64-bit
range`` escaped ``run``), the second retried the database error inside the batch and so stalled every other
partition, and the third skipped the undecodable message."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, text

from ledger import queries
from ledger.consumer import ConsumerStats, run
from ledger.contracts import TOPIC_LEDGER_CHARGES, ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.kafka import make_producer
from ledger.settings import LedgerSettings

pytestmark = pytest.mark.integration

SOURCE = "usage.events.v1"
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("1"))


def _settings(database_url: str, topics: Any, group: str) -> LedgerSettings:
    return LedgerSettings.model_validate({
        "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
        "METERLINE_TOPIC_PREFIX": topics.prefix, "consumer_group": group, "outbox_poll_ms": 50, "db_pool_size": 3,
        "consumer_retry_backoff_s_max": 1.0,
    })


def _checkpoint(partition: int, as_of: int, units: dict[str, int | str]) -> bytes:
    return ChargeCheckpoint(
        source_topic=SOURCE, partition=partition, as_of_offset=as_of, emitted_at=datetime.now(UTC),
        counters=[CounterValue(key=CounterKey(wallet_id=w, project_id="p1", meter_id="tokens", period_start=PERIOD,
                                              price_version_id="v1"), units=Decimal(u), price=PRICE, events=1)
                  for w, u in units.items()],
    ).model_dump_json().encode()


def _produce(topics: Any, sends: list[tuple[int, bytes]]) -> None:
    producer = make_producer(topics.bootstrap)
    for charges_partition, value in sends:
        producer.produce(topics.name(TOPIC_LEDGER_CHARGES), value=value, partition=charges_partition)
    assert producer.flush(15) == 0


class _Consumer:
    """``ledger.consumer.run`` in a thread (what ``meterline run ledger`` runs)."""

    def __init__(self, settings: LedgerSettings) -> None:
        self.stop = threading.Event()
        self.result: dict[str, ConsumerStats | BaseException] = {}
        self.thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self.thread.start()

    def _run(self, settings: LedgerSettings) -> None:
        try:
            self.result["stats"] = run(settings, self.stop)
        except BaseException as exc:  # the test asserts the consumer never died
            self.result["error"] = exc

    def close(self) -> ConsumerStats:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        assert "error" not in self.result, self.result["error"]
        stats = self.result["stats"]
        assert isinstance(stats, ConsumerStats)
        return stats


def _wait(engine: Engine, predicate: Callable[[Any], bool], *, what: str, timeout_s: float = 60,
          consumer: _Consumer | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            conn.rollback()
            if predicate(conn):
                return
            if consumer is not None:
                assert consumer.thread.is_alive(), f"the consumer died: {consumer.result}"
            time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _balance(conn: Any, wallet: str) -> int | None:
    view = queries.get_balance(conn, wallet)
    return view.balance_minor if view else None


def test_a_value_beyond_64_bits_halts_only_its_source_partition_and_is_never_skipped(
        engine: Engine, database_url: str, topics: Any) -> None:
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    huge = str(10**30)  # a valid JSON integer, accepted by the ingest API on cbf7ba4; price(units) > 2^63
    _produce(topics, [
        (0, _checkpoint(0, 10, {"A": 90})),
        (0, _checkpoint(0, 20, {"H": huge})),          # cannot be applied: the source partition 0 halts here
        (0, _checkpoint(2, 7, {"B": 5})),              # another source partition on the SAME charges partition
        (0, _checkpoint(0, 30, {"A": 95})),            # behind the halted one: queued, never applied before it
        (1, _checkpoint(1, 5, {"C": 25})),
    ])
    consumer = _Consumer(_settings(database_url, topics, group))
    try:
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0, 1, 2]) == {0: 10, 1: 5, 2: 7}
              and len(queries.partition_halts(c)) == 1, what="the other partitions applied, partition 0 halted",
              consumer=consumer)
        _produce(topics, [(1, _checkpoint(1, 6, {"C": 40}))])  # the pipeline keeps going
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [1])[1] == 6, what="later checkpoints",
              consumer=consumer)
        # retried with backoff, still halted, still not skipped
        _wait(engine, lambda c: queries.partition_halts(c)[0].attempts >= 3, what="retries", consumer=consumer)
    finally:
        stats = consumer.close()
    assert stats.halts == 1 and stats.halt_retries >= 2 and stats.resumes == 0
    with engine.connect() as conn:
        [halt] = queries.partition_halts(conn)
        assert (halt.scope, halt.topic, halt.partition, halt.as_of_offset, halt.charges_partition) == \
            ("source", SOURCE, 0, 20, 0)
        assert halt.reason == "apply_failed" and "64-bit" in halt.error, halt
        assert halt.pending_checkpoints == 2  # the bad one and the one queued behind it
        assert queries.applied_offsets(conn, SOURCE, [0]) == {0: 10}
        assert {w: _balance(conn, w) for w in "ABCH"} == {"A": -90, "B": -5, "C": -40, "H": None}

    # a restart does not skip it either: the charges offset was held at the halted checkpoint
    consumer = _Consumer(_settings(database_url, topics, group))
    try:
        _wait(engine, lambda c: queries.partition_halts(c)[0].attempts == 1
              and queries.partition_halts(c)[0].consumer != halt.consumer,
              what="the restarted consumer to halt on the same checkpoint", consumer=consumer)
    finally:
        consumer.close()
    with engine.connect() as conn:
        assert queries.applied_offsets(conn, SOURCE, [0, 2]) == {0: 10, 2: 7}
        assert _balance(conn, "A") == -90


def test_a_database_error_halts_one_partition_which_resumes_by_itself_when_fixed(
        engine: Engine, database_url: str, topics: Any, invariants: Callable[..., None]) -> None:
    # The cause, outside the ledger's control: a rule in the database refuses partition 1's counters.
    with engine.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION refuse_p1() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.partition = 1 THEN RAISE EXCEPTION 'partition 1 refused by an operator rule'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_p1 BEFORE INSERT OR UPDATE ON usage_counters
                FOR EACH ROW EXECUTE FUNCTION refuse_p1();
        """))
    _produce(topics, [(0, _checkpoint(0, 10, {"A": 10})), (1, _checkpoint(1, 10, {"B": 20}))])
    consumer = _Consumer(_settings(database_url, topics, f"ledger-{uuid.uuid4().hex[:8]}"))
    try:
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0])[0] == 10
              and [h.partition for h in queries.partition_halts(c)] == [1], what="partition 1 halted",
              consumer=consumer)
        _produce(topics, [(0, _checkpoint(0, 20, {"A": 15})), (1, _checkpoint(1, 20, {"B": 30}))])
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0])[0] == 20, what="partition 0 goes on",
              consumer=consumer)
        with engine.connect() as conn:
            [halt] = queries.partition_halts(conn)
            assert halt.reason == "database_error" and "operator rule" in halt.error
            assert queries.applied_offsets(conn, SOURCE, [1]) == {1: -1}
        with engine.begin() as conn:  # the operator fixes the cause; nothing else is done
            conn.execute(text("DROP TRIGGER refuse_p1 ON usage_counters"))
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [1])[1] == 20 and not queries.partition_halts(c),
              what="partition 1 to resume by itself", consumer=consumer)
    finally:
        stats = consumer.close()
    assert stats.halts == 1 and stats.resumes == 1
    with engine.connect() as conn:
        assert {w: _balance(conn, w) for w in "AB"} == {"A": -15, "B": -30}
    invariants()


def test_an_undecodable_checkpoint_halts_its_charges_partition_and_is_never_skipped(
        engine: Engine, database_url: str, topics: Any) -> None:
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    _produce(topics, [
        (0, _checkpoint(0, 10, {"A": 10})),
        (0, b"{not json"),                      # whose partition? unknowable: the charges partition halts
        (0, _checkpoint(0, 20, {"A": 20})),     # behind it: on cbf7ba4 applied, the message above skipped
        (0, _checkpoint(2, 5, {"B": 5})),
        (1, _checkpoint(1, 5, {"C": 5})),       # another charges partition goes on
    ])
    consumer = _Consumer(_settings(database_url, topics, group))
    try:
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0, 1, 2]) == {0: 10, 1: 5, 2: -1}
              and len(queries.partition_halts(c)) == 1, what="charges partition 0 halted", consumer=consumer)
        time.sleep(2)  # retries happen; nothing behind the undecodable message is applied
    finally:
        stats = consumer.close()
    assert stats.undecodable >= 1 and stats.halts == 1
    with engine.connect() as conn:
        [halt] = queries.partition_halts(conn)
        assert (halt.scope, halt.partition, halt.reason, halt.charges_offset, halt.pending_checkpoints) == \
            ("charges", 0, "undecodable", 1, 3)
        assert queries.applied_offsets(conn, SOURCE, [0, 2]) == {0: 10, 2: -1}
    consumer = _Consumer(_settings(database_url, topics, group))  # not skipped after a restart either
    try:
        _wait(engine, lambda c: queries.partition_halts(c)[0].consumer != halt.consumer, what="halted again",
              consumer=consumer)
    finally:
        consumer.close()
    with engine.connect() as conn:
        assert queries.applied_offsets(conn, SOURCE, [0, 2]) == {0: 10, 2: -1}


@pytest.mark.parametrize("bound", ["messages", "bytes"])
def test_a_long_halt_pauses_its_charges_partition_and_loses_nothing_on_resume(
        engine: Engine, database_url: str, topics: Any, invariants: Callable[..., None], bound: str) -> None:
    """The memory bound: past ``consumer_halted_pending_max`` queued checkpoints, or
    ``consumer_halted_pending_bytes_max`` bytes of them, the charges partition stops being fetched; what the client
    had prefetched is dropped and fetched again on resume. Every checkpoint names a wallet of its own, so one that
    was dropped and not fetched again would leave its wallet uncharged."""
    with engine.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION refuse_p0() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.partition = 0 THEN RAISE EXCEPTION 'partition 0 refused by an operator rule'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_p0 BEFORE INSERT OR UPDATE ON usage_counters
                FOR EACH ROW EXECUTE FUNCTION refuse_p0();
        """))
    # the checkpoints below are ~400 bytes each: 3 of them reach the byte bound as the count bound would
    size = len(_checkpoint(0, 10, {"W10": 10}))
    limit = ({"consumer_halted_pending_max": 3} if bound == "messages"
             else {"consumer_halted_pending_bytes_max": 3 * size - 10})
    settings = _settings(database_url, topics, f"ledger-{uuid.uuid4().hex[:8]}").model_copy(
        update={**limit, "consumer_batch_messages_max": 2})
    consumer = _Consumer(settings)
    try:
        _produce(topics, [(0, _checkpoint(0, 1, {"W1": 1}))])
        _wait(engine, lambda c: len(queries.partition_halts(c)) == 1, what="partition 0 halted", consumer=consumer)
        _produce(topics, [(0, _checkpoint(0, n, {f"W{n}": n})) for n in range(2, 41)]
                 + [(0, _checkpoint(2, 5, {"X": 5}))])
        _wait(engine, lambda c: queries.partition_halts(c)[0].pending_checkpoints >= 3, what="the queue at its bound",
              consumer=consumer)
        time.sleep(3)  # paused: the queue stays bounded while the retries go on
        with engine.connect() as conn:
            assert queries.partition_halts(conn)[0].pending_checkpoints <= 4
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_p0 ON usage_counters"))
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0, 2]) == {0: 40, 2: 5}
              and not queries.partition_halts(c), what="everything applied after the resume", consumer=consumer)
    finally:
        stats = consumer.close()
    assert stats.halts == 1 and stats.resumes == 1
    with engine.connect() as conn:
        charged = {f"W{n}": _balance(conn, f"W{n}") for n in range(1, 41)}
        assert charged == {f"W{n}": -n for n in range(1, 41)}, charged
        assert _balance(conn, "X") == -5
    invariants()


def test_a_backlog_is_taken_in_batches_bounded_by_bytes(
        engine: Engine, database_url: str, topics: Any, invariants: Callable[..., None]) -> None:
    """A batch is decoded whole, so its bytes are the consumer's memory under a backlog (a checkpoint of many
    wallets is ~1.4 MB fetched, ~12 MB decoded). 30 checkpoints wait in the topic before the consumer starts; with
    room for 2.5 of them per batch it takes at most 3 at a time — the count bound alone took all 30 in one — and
    charges every wallet exactly once."""
    sends = [(0, _checkpoint(0, n, {f"B{n}": n, f"C{n}": 1})) for n in range(1, 31)]
    size = max(len(value) for _, value in sends)
    _produce(topics, sends)
    settings = _settings(database_url, topics, f"ledger-{uuid.uuid4().hex[:8]}").model_copy(
        update={"consumer_batch_bytes_max": int(2.5 * size)})
    consumer = _Consumer(settings)
    try:
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0]) == {0: 30}, what="the backlog applied",
              consumer=consumer)
    finally:
        stats = consumer.close()
    assert stats.batch_bytes_max <= 3 * size, (stats.batch_bytes_max, size)
    assert stats.batches >= 10 and stats.applied == 30
    with engine.connect() as conn:
        charged = {w: _balance(conn, w) for n in range(1, 31) for w in (f"B{n}", f"C{n}")}
    assert charged == {**{f"B{n}": -n for n in range(1, 31)}, **{f"C{n}": -1 for n in range(1, 31)}}, charged
    invariants()


def test_a_checkpoint_failing_inside_a_merged_chunk_halts_with_every_counter_at_its_mark(
        engine: Engine, database_url: str, topics: Any, invariants: Callable[..., None]) -> None:
    """A backlog of one partition is decoded as one merged chunk, thinned of the counters a later checkpoint lists
    again (ledger/lane_chunks.py: wallet K is kept only in the last). Checkpoint 4 cannot be applied, so the chunk
    fails and is retried checkpoint by checkpoint AS FETCHED: 1–3 apply with K's values, 4 halts. While halted the
    stored counters match the mark (streams seeds from them) — K at 3, not missing — and after the fix all is exact."""
    with engine.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.wallet_id = 'BAD' THEN RAISE EXCEPTION 'wallet BAD refused by an operator rule'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_bad BEFORE INSERT OR UPDATE ON usage_counters
                FOR EACH ROW EXECUTE FUNCTION refuse_bad();
        """))
    _produce(topics, [(0, _checkpoint(0, n, {"K": n, f"U{n}": n, **({"BAD": 1} if n == 4 else {})}))
                      for n in range(1, 7)])
    consumer = _Consumer(_settings(database_url, topics, f"ledger-{uuid.uuid4().hex[:8]}"))
    try:
        _wait(engine, lambda c: len(queries.partition_halts(c)) == 1, what="the lane halted", consumer=consumer)
        with engine.connect() as conn:
            assert queries.applied_offsets(conn, SOURCE, [0]) == {0: 3}
            stored = conn.execute(text("SELECT units FROM usage_counters WHERE wallet_id = 'K'")).scalar_one()
            assert stored == 3
            assert [_balance(conn, w) for w in ("K", "U1", "U3", "U4", "U6")] == [-3, -1, -3, None, None]
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_bad ON usage_counters"))
        _wait(engine, lambda c: queries.applied_offsets(c, SOURCE, [0]) == {0: 6} and not queries.partition_halts(c),
              what="everything applied after the fix", consumer=consumer)
    finally:
        stats = consumer.close()
    assert stats.halts == 1 and stats.resumes == 1
    with engine.connect() as conn:
        assert {w: _balance(conn, w) for w in ["K", "BAD", *(f"U{n}" for n in range(1, 7))]} == {
            "K": -6, "BAD": -1, **{f"U{n}": -n for n in range(1, 7)}}
    invariants()
