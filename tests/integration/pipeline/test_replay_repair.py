"""`meterline replay` (meterline/cli_replay.py, streams/replay_diff.py, ledger/corrections.py) against the real
broker and PostgreSQL, within one broker life.

The ledger is fed the way the live workers feed it: the test reads the usage topic back, meters it with the
workers' own core (PartitionAggregator), one checkpoint per message, and applies each with the ledger's
``apply_checkpoints``. To lose a checkpoint it simply does not apply one (the last one of a subject, so no later
checkpoint carries its totals), then restarts the "worker": a new aggregator seeded from the ledger, as after a
crash — the loss is now permanent, which is what a replay must find and repair."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pipeline_harness import PROJECT, EventProducer, make_event, price_floor, setup_catalog, wallet_of
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from ledger import queries
from ledger.checkpoints import apply_checkpoints
from ledger.contracts import ChargeCheckpoint
from ledger.corrections import apply_correction
from ledger.db import make_engine
from meterline.cli_reconcile import _read_partition
from meterline.cli_replay import run_replay
from streams import catalog as catalog_db
from streams.catalog_model import ProjectPolicy
from streams.contracts import partition_for
from streams.metering import Limits, PartitionAggregator, SeedCounter

PRICE = Decimal("0.4")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=2)
    yield eng
    eng.dispose()


def _same_partition(subject: str, partitions: int, prefix: str) -> str:
    target = partition_for(subject, partitions)
    return next(f"{prefix}-{i}" for i in range(10_000) if partition_for(f"{prefix}-{i}", partitions) == target)


class Feeder:
    """Stands in for a streams worker: produces per-subject messages, meters them, applies checkpoints."""

    def __init__(self, topics: Any, engine: Engine) -> None:
        self.topic = topics.name("usage.events.v1")
        self.bootstrap = topics.bootstrap
        self.partitions = topics.usage_partitions
        self.engine = engine
        self.producer = EventProducer(topics.bootstrap, self.topic, topics.usage_partitions)
        self.aggregators: dict[int, PartitionAggregator] = {}
        self.units: dict[str, Decimal] = {}
        self._next_id = 0

    def send(self, subject: str, tokens: list[int]) -> None:
        events = []
        for t in tokens:
            self._next_id += 1
            events.append(make_event(self._next_id, subject, t))
        self.producer.send_raw(orjson.dumps(events), partition=partition_for(subject, self.partitions))
        self.units[subject] = self.units.get(subject, Decimal(0)) + sum(tokens)

    def catalog(self) -> Any:
        with self.engine.connect() as conn:
            return catalog_db.load_catalog(conn, default_policy=ProjectPolicy("auto_provision", 86_400))

    def seed(self, p: int) -> PartitionAggregator:
        """What a (re)started worker does on assignment: seed from the ledger's counters and mark."""
        with self.engine.connect() as conn:
            snap = queries.partition_snapshot(conn, self.topic, [p])
        agg = PartitionAggregator(source_topic=self.topic, partition=p, partitions=self.partitions, limits=Limits())
        agg.seed(applied_through=snap.applied_through[p], dedupe_keys=(), counters=[
            SeedCounter(c.wallet_id, c.project_id, c.meter_id, c.period_start, c.price_version_id, Decimal(c.units),
                        c.events, c.late_events, c.latest_at) for c in snap.counters])
        self.aggregators[p] = agg
        return agg

    def meter(self, *, drop: tuple[int, int] | None = None) -> None:
        """Meter everything sent so far, one checkpoint per message; ``drop`` = (partition, offset) not applied."""
        sent = self.producer.flush()
        catalog = self.catalog()
        for p, last in sorted(sent.last_offset.items()):
            agg = self.aggregators.get(p) or self.seed(p)
            if agg.processed_through >= last:
                continue
            deadline = time.monotonic() + 30
            for offset, value, arrival in _read_partition(self.bootstrap, self.topic, p, last, deadline):
                agg.process(offset=offset, value=value, arrival=arrival, catalog=catalog)
                cp = agg.checkpoint()
                if cp is None or drop == (p, offset):
                    continue
                wire = ChargeCheckpoint.model_validate_json(cp.to_json(emitted_at=datetime.now(UTC)))
                with self.engine.begin() as conn:
                    assert apply_checkpoints(conn, [wire]).applied == 1
            assert agg.processed_through == last


def _charged(engine: Engine, subject: str) -> int:
    with engine.connect() as conn:
        return -int(conn.execute(text("SELECT coalesce(sum(amount_minor), 0) FROM transactions WHERE wallet_id = :w"),
                                 {"w": wallet_of(subject)}).scalar_one())


def _replay(database_url: str, feeder: Feeder, *, apply: bool, **selection: Any) -> dict[str, Any]:
    return run_replay(database_url=database_url, bootstrap=feeder.bootstrap, topic=feeder.topic,
                      partitions=feeder.partitions, wanted=selection.pop("wanted", range(feeder.partitions)),
                      from_offset=selection.pop("from_offset", None), to_offset=None, since=None, until=None,
                      project=selection.pop("project", None), subjects=selection.pop("subjects", []), meters=[],
                      apply=apply, timeout_s=60)


def test_a_clean_run_replays_to_zero_differences_in_every_format(database_url: str, topics: Any, engine: Engine,
                                                                  stack_env: dict[str, str],
                                                                  clear_settings_caches: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    setup_catalog(database_url)
    feeder = Feeder(topics, engine)
    for round_ in range(3):
        for subject in ("alice", "bob", "carol", "dave"):
            feeder.send(subject, [3 + round_, 5, 7])
    feeder.meter()

    for key, value in stack_env.items():
        monkeypatch.setenv(key, value)
    from meterline.cli import app

    result = CliRunner().invoke(app, ["replay", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["differences"] == [] and report["incomplete_partitions"] == []
    assert report["messages"] == 12 and report["applied"] is None
    narrowed = CliRunner().invoke(app, ["replay", "--format", "csv", "--project", PROJECT, "--subject", "alice",
                                        "--meter", "tokens", "--from-offset", "1"])
    assert narrowed.exit_code == 0, narrowed.output
    assert narrowed.stdout.strip().splitlines()[-1].startswith("project_id,")  # a header, no rows
    for subject, units in feeder.units.items():
        assert _charged(engine, subject) == price_floor(units, PRICE)


def test_a_lost_checkpoint_is_found_repaired_once_and_the_pipeline_continues_exactly(
        database_url: str, topics: Any, engine: Engine) -> None:
    setup_catalog(database_url)
    feeder = Feeder(topics, engine)
    carol_p = partition_for("carol", topics.usage_partitions)
    neighbour = _same_partition("carol", topics.usage_partitions, "neighbour")
    feeder.send("alice", [10, 20])
    feeder.send("carol", [11, 12, 13])
    feeder.send("carol", [14, 15])  # its checkpoint is lost: carries carol's 26 last units of the period
    feeder.send(neighbour, [9])  # a later checkpoint of the partition moves the mark past the lost one
    sent = feeder.producer.flush()
    lost = (carol_p, sent.last_offset[carol_p] - 1)
    feeder.meter(drop=lost)
    feeder.seed(carol_p)  # the worker restarts: it seeds carol at 36 from the ledger — the loss is permanent
    assert _charged(engine, "carol") == price_floor(Decimal(36), PRICE)

    dry = _replay(database_url, feeder, apply=False)
    assert [(d["wallet_id"], d["ledger_units"], d["replayed_units"], d["amount_minor"], d["repairable"])
            for d in dry["differences"]] == [
        (wallet_of("carol"), "36", "65", price_floor(Decimal(65), PRICE) - price_floor(Decimal(36), PRICE), True)]
    narrowed = _replay(database_url, feeder, apply=False, project=PROJECT, subjects=["alice"])
    assert narrowed["differences"] == []  # the filter keeps other subjects' keys out

    repaired = _replay(database_url, feeder, apply=True)
    assert repaired["replay_id"] == dry["replay_id"]  # deterministic: same log, same marks, same selection
    assert repaired["applied"] == {"outcome": "applied", "keys": 1, "transactions": 1,
                                   "amount_minor": price_floor(Decimal(65), PRICE) - price_floor(Decimal(36), PRICE)}
    assert _charged(engine, "carol") == price_floor(Decimal(65), PRICE)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT kind, reason, idempotency_key, source_ref, meter_id FROM transactions "
                                "WHERE wallet_id = :w ORDER BY id DESC LIMIT 1"), {"w": wallet_of("carol")}).one()
    assert row.kind == "adjustment" and repaired["replay_id"] in row.idempotency_key
    assert repaired["replay_id"] in row.source_ref and repaired["replay_id"] in row.reason and row.meter_id

    again = _replay(database_url, feeder, apply=True)
    assert again["differences"] == [] and again["applied"] is None  # the correction counts on the ledger side
    with engine.begin() as conn:  # the same replay id applied twice: stale, nothing posted
        from ledger.contracts import CounterKey, CounterValue, PriceModel

        key = CounterKey(wallet_id=wallet_of("carol"), project_id=PROJECT, meter_id="x",
                         period_start=datetime(2026, 1, 1, tzinfo=UTC), price_version_id="x")
        twice = apply_correction(conn, source_id=feeder.topic, replay_id=repaired["replay_id"], counters=[
            CounterValue(key=key, units=Decimal(1), price=PriceModel(model="per_unit", unit_price_minor=Decimal(1)),
                         events=1)])
    assert twice.status == "stale"
    assert _charged(engine, "carol") == price_floor(Decimal(65), PRICE)

    # the restarted worker goes on from its seed (36 + new units); the ledger prices partition + correction
    feeder.send("carol", [35])
    feeder.meter()
    assert _charged(engine, "carol") == price_floor(Decimal(100), PRICE)
    assert _replay(database_url, feeder, apply=False)["differences"] == []
    assert _charged(engine, "alice") == price_floor(Decimal(30), PRICE)


def test_the_scheduled_reconciliation_names_the_drifted_wallet_and_reports_zero_after_the_repair(
        database_url: str, topics: Any, engine: Engine) -> None:
    import threading

    from ledger.reconciliation import latest_report
    from meterline.reconcile_job import Reconciler, run_once

    setup_catalog(database_url)
    feeder = Feeder(topics, engine)
    carol_p = partition_for("carol", topics.usage_partitions)
    feeder.send("carol", [11, 12])
    feeder.send("carol", [13])
    feeder.send(_same_partition("carol", topics.usage_partitions, "neighbour"), [9])
    sent = feeder.producer.flush()
    feeder.meter(drop=(carol_p, sent.last_offset[carol_p] - 1))
    with engine.connect() as conn:
        assert latest_report(conn, PROJECT) is None

    run_once(database_url=database_url, bootstrap=topics.bootstrap, topic_prefix=topics.prefix, timeout_s=60)
    with engine.connect() as conn:
        report = latest_report(conn, PROJECT)
        other = latest_report(conn, "another-project")
    assert report is not None and report.complete and report.messages == 3
    [(wallet, meter, units, amount)] = [(d["wallet_id"], d["meter_id"], d["replayed_units"], d["amount_minor"])
                                        for d in report.differences]
    assert (wallet, units, amount) == (wallet_of("carol"), "36", price_floor(Decimal(36), PRICE)
                                       - price_floor(Decimal(23), PRICE)) and meter
    assert report.drift_minor == amount and other is not None and other.differences == []

    _replay(database_url, feeder, apply=True)
    run_once(database_url=database_url, bootstrap=topics.bootstrap, topic_prefix=topics.prefix, timeout_s=60)
    with engine.connect() as conn:
        after = latest_report(conn, PROJECT)
    assert after is not None and after.id > report.id and after.differences == []

    # the job only starts a replay when due, on a thread, never two at once
    release, runs = threading.Event(), []
    reconciler = Reconciler(0.01, lambda: (runs.append(1), release.wait(10)))
    time.sleep(0.02)
    assert reconciler.tick() == 1 and reconciler.tick() == 0  # the first is still running
    release.set()
    assert reconciler.thread is not None
    reconciler.thread.join(5)
    time.sleep(0.02)
    assert reconciler.tick() == 1 and len(runs) >= 1
    assert Reconciler(0, lambda: None).tick() == 0  # 0 = never
