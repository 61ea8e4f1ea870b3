"""Real-process pipeline harness: streams workers and ledger consumers as `python -m meterline run ...`
subprocesses against this test's database and topics, a producer that knows what it sent, and the
ledger-side "everything applied" wait (applied marks vs. delivery reports — never end offsets)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, Producer

from ledger.db import libpq_url, make_engine
from streams import catalog
from streams.catalog_model import auto_wallet_id
from streams.contracts import partition_for

REPO = Path(__file__).resolve().parents[3]
PROJECT = "prj_pipeline"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class Pipeline:
    env: dict[str, str]
    database_url: str
    bootstrap: str
    prefix: str
    partitions: int
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    _counter: int = 0

    @property
    def usage_topic(self) -> str:
        return f"{self.prefix}usage.events.v1"

    def start(self, component: str, **extra_env: str) -> Proc:
        self._counter += 1
        name = f"{component}-{self._counter}"
        log_path = self.log_dir / f"{name}.log"
        out = log_path.open("ab")
        popen = subprocess.Popen([sys.executable, "-m", "meterline", "run", component], cwd=REPO,
                                 env={**os.environ, **self.env, **extra_env}, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()

    # -- database ----------------------------------------------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def applied(self) -> dict[int, int]:
        rows = self.sql("SELECT partition, applied_through FROM applied_offsets WHERE source_topic = %s",
                        self.usage_topic)
        return {int(p): int(a) for p, a in rows}

    def wait_applied(self, last_offsets: dict[int, int], *, timeout_s: float, watch: list[Proc] | None = None) -> None:
        """Until the ledger's applied mark of every partition reaches the last offset we produced there."""
        deadline = time.monotonic() + timeout_s
        applied: dict[int, int] = {}
        while time.monotonic() < deadline:
            applied = self.applied()
            if all(applied.get(p, -1) >= o for p, o in last_offsets.items()):
                return
            for proc in watch or []:
                assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
            time.sleep(0.2)
        logs = "\n\n".join(f"== {p.name}\n{p.tail(25)}" for p in self.procs[-4:])
        raise AssertionError(f"ledger did not catch up: applied {applied} < produced {last_offsets}\n{logs}")

    def wallet_balances(self) -> dict[str, int]:
        return {w: int(b) for w, b in self.sql("SELECT id, balance_minor FROM wallets WHERE project_id = %s", PROJECT)}

    def charges(self) -> dict[tuple[str, str], tuple[Decimal, int]]:
        """(wallet, price_version) -> (merged units, charged_minor) over all periods."""
        out: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for w, pv, units, charged in self.sql(
                "SELECT wallet_id, price_version_id, units, charged_minor FROM usage_charges WHERE project_id = %s",
                PROJECT):
            u, c = out.get((w, pv), (Decimal(0), 0))
            out[(w, pv)] = (u + units, c + int(charged))
        return out

    def assert_ledger_consistent(self) -> None:
        """Every transaction is unique, chains its wallet's balance, and the wallet equals its sum."""
        dup = self.sql("SELECT idempotency_key, count(*) FROM transactions GROUP BY 1 HAVING count(*) > 1")
        assert dup == []
        mismatched = self.sql("""
            SELECT w.id FROM wallets w LEFT JOIN transactions t ON t.wallet_id = w.id
            WHERE w.project_id = %s GROUP BY w.id, w.balance_minor
            HAVING w.balance_minor <> coalesce(sum(t.amount_minor), 0)""", PROJECT)
        assert mismatched == []
        sums = self.sql("""
            SELECT c.wallet_id, c.meter_id, c.period_start, c.price_version_id, c.charged_minor,
                   coalesce((SELECT -sum(t.amount_minor) FROM transactions t WHERE t.wallet_id = c.wallet_id
                     AND t.meter_id = c.meter_id AND t.period_start = c.period_start
                     AND t.price_version_id = c.price_version_id AND t.kind = 'usage'), 0)
            FROM usage_charges c WHERE c.project_id = %s""", PROJECT)
        assert [r for r in sums if r[4] != r[5]] == []


@dataclass
class Sent:
    """What the test produced, kept independently of the system under test."""

    last_offset: dict[int, int] = field(default_factory=dict)
    messages: int = 0
    events: int = 0


class EventProducer:
    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions = partitions
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                                  "linger.ms": 5, "compression.type": "lz4"})
        self.sent = Sent()
        self._errors: list[str] = []

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))
            return
        p = msg.partition()
        self.sent.last_offset[p] = max(self.sent.last_offset.get(p, -1), msg.offset())

    def send_packed(self, events: list[dict[str, Any]], *, pack: int = 200) -> None:
        """Events grouped by partition_for(subject), ``pack`` per message, order kept within a partition."""
        by_partition: dict[int, list[dict[str, Any]]] = {}
        for ev in events:
            by_partition.setdefault(partition_for(ev["subject"], self.partitions), []).append(ev)
        for p, evs in by_partition.items():
            for i in range(0, len(evs), pack):
                self.send_raw(orjson.dumps(evs[i:i + pack]), partition=p)
                self.sent.events += len(evs[i:i + pack])

    def send_raw(self, value: bytes, *, partition: int, key: bytes | None = None,
                 timestamp_ms: int | None = None) -> None:
        """``timestamp_ms``: the message's CreateTime (producer-set, the worker's arrival time); default now."""
        extra = {"timestamp": timestamp_ms} if timestamp_ms is not None else {}
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, partition=partition,
                                      on_delivery=self._delivered, **extra)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.sent.messages += 1
        self.producer.poll(0)

    def flush(self) -> Sent:
        assert self.producer.flush(60) == 0
        assert self._errors == []
        return self.sent


def make_event(i: int, subject: str, tokens: int | str, *, time: datetime | None = None, project: str = PROJECT,
               etype: str = "llm.tokens", source: str = "pipeline-test") -> dict[str, Any]:
    ev: dict[str, Any] = {"specversion": "1.0", "id": f"ev-{i}", "source": source, "type": etype,
                          "subject": subject, "project": project, "data": {"tokens": tokens}}
    ev["time"] = (time or datetime.now(UTC)).isoformat()
    return ev


def price_floor(units: Decimal, unit_price: Decimal) -> int:
    return int((units * unit_price).to_integral_value(rounding=ROUND_FLOOR))


def wallet_of(subject: str) -> str:
    return auto_wallet_id(PROJECT, subject)


def setup_catalog(database_url: str, *, unit_price: str = "0.4") -> dict[str, str]:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            meter = catalog.create_meter(conn, project_id=PROJECT, slug="tokens", event_type="llm.tokens",
                                         aggregation="SUM", value_property="$.tokens")
            price = catalog.create_price(conn, project_id=PROJECT, meter="tokens",
                                         model={"model": "per_unit", "unit_price_minor": unit_price},
                                         effective_from=datetime(2020, 1, 1, tzinfo=UTC))
    finally:
        engine.dispose()
    return {"meter_id": meter.id, "price_id": price.id, "price_version_id": price.versions[0].id}


def read_dlq_messages(bootstrap: str, topic: str, *, expected: int,
                      timeout_s: float = 30.0) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """The dead letters the worker produced, as (value, headers) exactly as they are on the topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlq-reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.queue.backoff.ms": 10})
    consumer.subscribe([topic])
    out: list[tuple[bytes, list[tuple[str, bytes]]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(out) < expected:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append((msg.value(), list(msg.headers() or [])))
    finally:
        consumer.close()
    return out
