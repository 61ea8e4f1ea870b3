"""End-to-end pipeline benchmark: usage events → 2 streams workers → 1 ledger consumer → wallet balances.

    .venv/bin/python bench/pipeline.py --seconds 60          # (or python -m bench.pipeline)

Phases, each bounded in time:
1. throughput: produce packed messages for --seconds as fast as the pipeline absorbs them (never more than
   --backlog events sent but not yet applied); events/s end to end = events applied / (last one applied in
   the ledger − first one sent).
2. latency: produce at a fixed --rate (default 20,000 events/s, open loop) for --seconds; event → balance
   latency = when the ledger's applied mark passed the message's offset − when the message was sent
   (applied marks polled every 20 ms; the ledger updates balances in the same transaction).
3. baseline: the naive faust design (bench/pipeline_baseline.py: one event per message, faust.Record, a
   table update per event, 2 workers) consuming the same number of events as phase 1, as fast as it can.
Both pipeline phases end with an exact-totals check of every wallet. Reports CPU seconds and peak RSS of
every process (workers, ledger, broker, PostgreSQL, this producer) and the machine.
Physical limits, measured first in the same run: raw confluent produce/consume at one event per message
(--raw-messages) and PostgreSQL's set-based insert, unnest and COPY (--pg-rows). --profile samples the streams
workers and the ledger with py-spy during each phase and prints their time by package and hottest functions.
--client librdkafka-default sends with librdkafka's own defaults (no idempotence, no bound on requests in flight)
instead of the idempotent client (Java's default): what a plain confluent-kafka client does unless told otherwise.

Engines: embedded (PostgreSQL, Tansu broker) under a temporary directory, or DATABASE_URL /
KAFKA_BOOTSTRAP_SERVERS from the environment (a scratch database is created and dropped).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import psutil
import psycopg
from confluent_kafka import Producer

from bench import profile_stacks
from bench.machine import describe
from bench.profile_stacks import StackSummary
from bench.stages import Applied, CheckpointWatcher, stage_latencies, weighted_percentile
from ledger.contracts import TOPIC_LEDGER_CHARGES
from ledger.db import libpq_url, make_engine, sqlalchemy_url
from meterline import services
from meterline.settings import StackSettings
from meterline.stack import migrate
from meterline.topics import ensure_topics, topic_specs
from streams import catalog
from streams.catalog_model import auto_wallet_id
from streams.contracts import TOPIC_USAGE_EVENTS, partition_for

REPO = Path(__file__).resolve().parent.parent
PROJECT = "prj_bench"
PRICE = Decimal("0.4")
USAGE_PARTITIONS = 8
CHARGES_PARTITIONS = 4


# -- engines -----------------------------------------------------------------------------------------------

@dataclass
class Engines:
    database_url: str
    bootstrap: str
    broker_pid: int | None
    pg_dir: Path | None
    store_pid: int | None = None  # the embedded broker's disk store (durable storage)


@contextlib.contextmanager
def engines(home: Path, *, broker_storage: str = "disk") -> Iterator[Engines]:
    with contextlib.ExitStack() as stack:
        base = os.environ.get("DATABASE_URL")
        pg_dir = None
        if not base:
            pg_dir = home / "postgres"
            base = services.start_embedded_postgres(pg_dir)
            stack.callback(services.stop_embedded_postgres, pg_dir)
        name = f"bench_pipeline_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(libpq_url(base), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

        def drop() -> None:
            with psycopg.connect(libpq_url(base), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        stack.callback(drop)
        from sqlalchemy.engine import make_url

        url = make_url(sqlalchemy_url(base)).set(database=name).render_as_string(hide_password=False)
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        broker_pid = store_pid = None
        if not bootstrap:
            broker = services.start_embedded_broker(
                host="127.0.0.1", port=services.free_port(), log_path=home / "broker.log",
                storage_dir=home / "broker" if broker_storage == "disk" else None,
                merge_after_s=StackSettings().broker_merge_after_s,  # METERLINE_BROKER_MERGE_AFTER_S=0: off
                merge_big_after_s=StackSettings().broker_merge_big_after_s)
            stack.callback(broker.stop)
            bootstrap, broker_pid = broker.bootstrap, broker.process.pid
            store_pid = broker.store.pid if broker.store is not None else None
        yield Engines(url, bootstrap, broker_pid, pg_dir, store_pid)


def postgres_pids(pg_dir: Path | None) -> list[int]:
    if pg_dir is None:
        return []
    try:
        master = int((pg_dir / "postmaster.pid").read_text().splitlines()[0])
        return [master, *(c.pid for c in psutil.Process(master).children(recursive=True))]
    except (OSError, ValueError, psutil.Error):
        return []


# -- process accounting ------------------------------------------------------------------------------------

@dataclass
class Usage:
    cpu_s: float = 0.0
    peak_rss: int = 0


class Meter:
    """CPU seconds over a phase and peak RSS (sampled every 0.25 s) of named process groups, and how busy the
    whole machine was.

    ``relist``: groups whose processes come and go (PostgreSQL forks a backend per connection, and a pool opens
    its connections when first needed): listed again at every sample, a process first seen mid-phase counted
    from then. Counting only the backends that existed at the phase's start left out the ledger's apply
    connections, and made a saturated machine look half idle."""

    def __init__(self, groups: dict[str, list[int]],
                 relist: Mapping[str, Callable[[], list[int]]] | None = None) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.relist = dict(relist or {})
        for name, lister in self.relist.items():
            self.groups[name] = lister()
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.usage: dict[str, Usage] = {name: Usage() for name in self.groups}
        self.machine_busy = float("nan")  # share of all cores busy over the phase
        self._machine_start: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _cpu(pid: int) -> float | None:
        try:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return None

    def __enter__(self) -> Meter:
        self._machine_start = psutil.cpu_times()
        for pids in self.groups.values():
            for pid in pids:
                cpu = self._cpu(pid)
                if cpu is not None:
                    self.start[pid] = self.last[pid] = cpu
        self._thread.start()
        return self

    def _track(self) -> None:
        """Each process's latest CPU time (a process that exits keeps its last sample)."""
        for name, lister in self.relist.items():
            self.groups[name] = sorted(set(self.groups[name]) | set(lister()))
        for pids in self.groups.values():
            for pid in pids:
                cpu = self._cpu(pid)
                if cpu is not None:
                    self.start.setdefault(pid, cpu)
                    self.last[pid] = cpu

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self._track()
            for name, pids in self.groups.items():
                rss = 0
                for pid in pids:
                    with contextlib.suppress(psutil.Error):
                        rss += psutil.Process(pid).memory_info().rss
                self.usage[name].peak_rss = max(self.usage[name].peak_rss, rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._track()
        for name, pids in self.groups.items():
            self.usage[name].cpu_s = sum(self.last[pid] - self.start[pid] for pid in pids if pid in self.last)
        end = psutil.cpu_times()
        busy = sum(getattr(end, f) - getattr(self._machine_start, f) for f in ("user", "system", "nice", "irq",
                                                                                "softirq", "steal"))
        total = sum(end) - sum(self._machine_start)
        self.machine_busy = busy / total if total > 0 else float("nan")

    def report(self, seconds: float) -> list[str]:
        lines = [f"    {name:<16} cpu {u.cpu_s:7.1f} s ({100 * u.cpu_s / max(seconds, 1e-9):5.1f}% of a core)  "
                 f"peak rss {u.peak_rss / 2**20:7.0f} MiB" for name, u in self.usage.items()]
        lines.append(f"    machine          {100 * self.machine_busy:5.1f}% of {psutil.cpu_count()} cores busy "
                     "(every process on it)")
        return lines


# -- producing and measuring -------------------------------------------------------------------------------

@dataclass
class Sent:
    events: int = 0
    messages: int = 0
    first_sent: float = 0.0
    last_offset: dict[int, int] = field(default_factory=dict)
    #: per partition, in offset order: (offset, sent at, events in the message, acknowledged at)
    deliveries: dict[int, list[tuple[int, float, int, float]]] = field(default_factory=lambda: defaultdict(list))
    units: dict[tuple[str, datetime], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    errors: list[str] = field(default_factory=list)


#: what a plain Kafka client of any language does with one event per message: keyed by subject, partitioned by
#: Kafka's murmur2 (librdkafka's own default is CRC32; streams/README "Wire shape")
PLAIN_CLIENT = {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4",
                "queue.buffering.max.kbytes": 262_144, "partitioner": "murmur2_random"}
#: ``--client``: ``idempotent`` is PLAIN_CLIENT (idempotence is Java's default, and with it at most 5 requests in
#: flight); ``librdkafka-default`` leaves idempotence off as librdkafka does by default, and with it up to 1,000,000
#: requests in flight per connection (what a confluent-kafka client sends with unless told otherwise)
PLAIN_CLIENTS = ("idempotent", "librdkafka-default")


def plain_client(client: str = "idempotent") -> dict[str, object]:
    """The load producer's settings for ``--client`` (without ``bootstrap.servers``)."""
    if client not in PLAIN_CLIENTS:
        raise ValueError(f"unknown client {client!r}: one of {', '.join(PLAIN_CLIENTS)}")
    return {**PLAIN_CLIENT, "enable.idempotence": client == "idempotent"}


class LoadProducer:
    """``pack`` > 1: packed messages of one partition's subjects, round robin over partitions (what the SDK does).
    ``pack`` 1: one event per message keyed by its subject, partitioned by librdkafka's murmur2 — a plain client."""

    def __init__(self, bootstrap: str, topic: str, *, subjects: int, pack: int, seed: int,
                 client: str = "idempotent") -> None:
        self.topic = topic
        self.pack = pack
        self.producer = Producer({"bootstrap.servers": bootstrap, **plain_client(client)})
        self.rng = random.Random(seed)
        by_partition: dict[int, list[str]] = defaultdict(list)
        for i in range(subjects):
            subject = f"user-{i}"
            by_partition[partition_for(subject, USAGE_PARTITIONS)].append(subject)
        self.subjects = dict(by_partition)
        self.all_subjects = [f"user-{i}" for i in range(subjects)]
        self.next_id = 0

    def run(self, sent: Sent, *, seconds: float, rate: float, tag: str, backlog: Any = None,
            backlog_max: int = 0) -> None:
        """Send packed messages for ``seconds`` (at ``rate`` events/s when > 0, else as fast as possible but
        never more than ``backlog_max`` events ahead of what the ledger applied: the sustained rate)."""
        if self.pack == 1:
            self._run_plain(sent, seconds=seconds, rate=rate, tag=tag, backlog=backlog, backlog_max=backlog_max)
            return
        started = time.monotonic()
        sent.first_sent = time.time()
        partition = 0
        now_iso = datetime.now(UTC).isoformat()
        month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        rng = self.rng
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            if backlog_max and backlog is not None and sent.events - backlog() > backlog_max:
                time.sleep(0.005)
                self.producer.poll(0)
                continue
            if rate > 0 and sent.events > rate * elapsed:
                time.sleep(min(0.002, sent.events / rate - elapsed))
                self.producer.poll(0)
                continue
            subjects = self.subjects[partition]
            events = []
            for _ in range(self.pack):
                subject = subjects[rng.randrange(len(subjects))]
                tokens = rng.randint(1, 100)
                self.next_id += 1
                events.append({"specversion": "1.0", "id": f"{tag}-{self.next_id}", "source": "bench",
                               "type": "llm.tokens", "subject": subject, "project": PROJECT, "time": now_iso,
                               "data": {"tokens": tokens}})
                sent.units[(subject, month)] += tokens
            self._send(sent, partition, orjson.dumps(events), len(events))
            partition = (partition + 1) % USAGE_PARTITIONS
            if sent.messages % 50 == 0:
                now_iso = datetime.now(UTC).isoformat()
        assert self.producer.flush(120) == 0, "producer could not deliver"
        assert not sent.errors, sent.errors[:3]

    def _run_plain(self, sent: Sent, *, seconds: float, rate: float, tag: str, backlog: Any, backlog_max: int) -> None:
        """One event per message, keyed by subject, murmur2-partitioned by the client; the send time of a message is
        its CreateTime (librdkafka stamps it in ``produce``), read back in the delivery report."""
        deliveries, last_offset, errors = sent.deliveries, sent.last_offset, sent.errors

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
                return
            p, offset = msg.partition(), msg.offset()
            deliveries[p].append((offset, msg.timestamp()[1] / 1000, 1, time.time()))
            if offset > last_offset.get(p, -1):
                last_offset[p] = offset

        produce, poll, topic = self.producer.produce, self.producer.poll, self.topic
        subjects, units, rng = self.all_subjects, sent.units, self.rng
        month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        started = time.monotonic()
        sent.first_sent = time.time()
        n = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            if backlog_max and backlog is not None and n - backlog() > backlog_max:
                time.sleep(0.005)
                poll(0)
                continue
            if rate > 0 and n > rate * elapsed:
                time.sleep(min(0.002, n / rate - elapsed))
                poll(0)
                continue
            now_iso = datetime.now(UTC).isoformat()
            for _ in range(100):  # a slice between clock and backlog checks
                subject = subjects[rng.randrange(len(subjects))]
                tokens = rng.randint(1, 100)
                self.next_id += 1
                value = orjson.dumps({"specversion": "1.0", "id": f"{tag}-{self.next_id}", "source": "bench",
                                      "type": "llm.tokens", "subject": subject, "project": PROJECT, "time": now_iso,
                                      "data": {"tokens": tokens}})
                units[(subject, month)] += tokens
                while True:
                    try:
                        produce(topic, value=value, key=subject.encode(), on_delivery=delivered)
                        break
                    except BufferError:
                        poll(0.01)
                n += 1
                if rate > 0 and n > rate * (time.monotonic() - started):
                    break
            poll(0)
            sent.events = sent.messages = n
        assert self.producer.flush(120) == 0, "producer could not deliver"
        assert not sent.errors, sent.errors[:3]

    def _send(self, sent: Sent, partition: int, value: bytes, n: int) -> None:
        sent_at = time.time()

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                sent.errors.append(str(err))
                return
            sent.deliveries[partition].append((msg.offset(), sent_at, n, time.time()))
            sent.last_offset[partition] = max(sent.last_offset.get(partition, -1), msg.offset())

        while True:
            try:
                self.producer.produce(self.topic, value=value, partition=partition, on_delivery=delivered)
                break
            except BufferError:
                self.producer.poll(0.01)
        self.producer.poll(0)
        sent.events += n
        sent.messages += 1


class AppliedWatcher:
    """Polls applied_offsets every 20 ms; records when each delivered message's offset was applied."""

    def __init__(self, database_url: str, topic: str, sent: Sent) -> None:
        self.url = libpq_url(database_url)
        self.topic = topic
        self.sent = sent
        self.latencies: list[tuple[float, int]] = []  # (seconds, events)
        self.timeline: list[tuple[float, float, int]] = []  # (sent at, seconds, events)
        self.applied: list[Applied] = []  # every message, for the latency by stage
        self.last_applied_at = 0.0
        self._cursor: dict[int, int] = defaultdict(int)
        self.applied_events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> AppliedWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute("SELECT partition, applied_through FROM applied_offsets WHERE source_topic = %s",
                                    (self.topic,)).fetchall()
                now = time.time()
                for p, applied in rows:
                    deliveries = self.sent.deliveries.get(p, [])
                    i = self._cursor[p]
                    while i < len(deliveries) and deliveries[i][0] <= applied:
                        offset, sent_at, n, acked_at = deliveries[i]
                        self.latencies.append((now - sent_at, n))
                        self.applied.append(Applied(p, offset, sent_at, acked_at, now, n))
                        self.timeline.append((sent_at, now - sent_at, n))
                        self.applied_events += n
                        self.last_applied_at = now
                        i += 1
                    self._cursor[p] = i
                time.sleep(0.02)

    def wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = sum(n for _, n in self.latencies)
            if done >= self.sent.events:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def percentile(self, q: float, latencies: list[tuple[float, int]] | None = None) -> float:
        return weighted_percentile(self.latencies if latencies is None else latencies, q)

    def windows(self, width_s: float = 10.0) -> list[tuple[int, float, float]]:
        """(window start in s since the first send, p50, p99) per ``width_s`` of send time: shows whether a
        phase's p99 is spread evenly or made by one stall."""
        if not self.timeline:
            return []
        first = min(t for t, _, _ in self.timeline)
        by_window: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for sent_at, latency, n in self.timeline:
            by_window[int((sent_at - first) // width_s)].append((latency, n))
        return [(int(w * width_s), self.percentile(0.50, lat), self.percentile(0.99, lat))
                for w, lat in sorted(by_window.items())]


def check_totals(database_url: str, sents: list[Sent], *, complete: bool = True,
                 posted_only: bool = False) -> tuple[bool, str]:
    """Balances are cumulative over every phase so far: the expected ones too. A balance is what the wallet shows
    once its unsettled usage is posted (``balance − unsettled``, ledger/settle.py); ``posted_only``: the posted
    balance alone (after the settle pass posted everything, it must be exact too).

    ``complete=False`` (the phase's wait ended before the ledger applied everything): a wallet may be behind —
    charged less than its events so far — but never ahead; ok means no wallet over-charged and no key posted
    twice, and the detail says how many are behind."""
    units_by_key: dict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    for sent in sents:
        for key, units in sent.units.items():
            units_by_key[key] += units
    expected: dict[str, int] = defaultdict(int)
    for (subject, _month), units in units_by_key.items():
        expected[auto_wallet_id(PROJECT, subject)] -= int((units * PRICE).to_integral_value(rounding=ROUND_FLOOR))
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        column = "balance_minor" if posted_only else "balance_minor - unsettled_minor"
        actual = dict(conn.execute(f"SELECT id, {column} FROM wallets WHERE project_id = %s",
                                   (PROJECT,)).fetchall())
        dup = conn.execute("SELECT count(*) FROM (SELECT idempotency_key FROM transactions GROUP BY 1 "
                           "HAVING count(*) > 1) d").fetchone()
    return judge_totals(expected, actual, dup[0] if dup else None, complete=complete)


def judge_totals(expected: dict[str, int], actual: dict[str, int], duplicates: int | None, *,
                 complete: bool) -> tuple[bool, str]:
    """Pure: (ok, detail) of balances (charges are negative) against what was sent; see ``check_totals``."""
    unexpected = [w for w in actual if w not in expected and actual[w]]
    if not complete:  # behind = less negative than expected; over-charged = more negative
        over = [w for w in expected if actual.get(w, 0) < expected[w]] + unexpected
        behind = len([w for w in expected if actual.get(w, 0) > expected[w]])
        return (not over and duplicates == 0,
                f"INCOMPLETE: the phase's wait ended first; {len(expected)} wallets, {behind} behind, "
                f"{len(over)} over-charged, {duplicates if duplicates is not None else '?'} duplicate keys")
    wrong = [w for w in expected if actual.get(w) != expected[w]] + unexpected
    ok = not wrong and duplicates == 0
    return ok, f"{len(expected)} wallets, {len(wrong)} wrong, {duplicates if duplicates is not None else '?'} duplicate keys"


def wait_settled(database_url: str, *, timeout_s: float) -> float:
    """Seconds until no usage is left unsettled (the ledger's settle pass posted every key); raises on timeout."""
    started = time.monotonic()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM usage_charges WHERE unsettled").fetchone()
            if row is not None and row[0] == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"usage still unsettled after {timeout_s:.0f} s: {row[0] if row else '?'} keys")
            time.sleep(0.5)


def ledger_rows(database_url: str) -> tuple[int, int]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM transactions), (SELECT count(*) FROM usage_counters)"
                           ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def pg_checkpoints(database_url: str) -> int:
    """PostgreSQL checkpoints so far (timed + requested): one during a phase is an I/O burst the latency feels."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        try:
            row = conn.execute("SELECT num_timed + num_requested FROM pg_stat_checkpointer").fetchone()
        except psycopg.errors.UndefinedTable:  # before PostgreSQL 17
            row = conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()
    assert row is not None
    return int(row[0])


def where_time_went(home: Path, since: float, until: float) -> list[str]:
    """Per process, the per-step seconds of its periodic stats log (streams_stats every 10 s,
    ledger_consumer_stats every 10 s) between the last lines before ``since`` and ``until``: where a phase's
    time went, as a share of the window between those two lines."""
    lines = []
    for log in [*sorted(home.glob("streams-*.log")), *sorted(home.glob("ledger*.log"))]:
        event = "ledger_consumer_stats" if log.name.startswith("ledger") else "streams_stats"
        stats = []
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if event not in line or not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    record = orjson.loads(line)
                    at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
                    stats.append((at, record))
        before = [s for s in stats if s[0] <= since] or stats[:1]
        within = [s for s in stats if s[0] <= until]
        if not before or not within or within[-1][0] <= before[-1][0]:
            continue
        (t0, a), (t1, b) = before[-1], within[-1]
        window = t1 - t0
        steps = ", ".join(f"{k[:-2]} {100 * (b[k] - a[k]) / window:.0f}%" for k in b if k.endswith("_s") and k in a)
        counts = ("checkpoints {:,}, batches {:,}".format(b["checkpoints"] - a["checkpoints"], b["batches"] - a["batches"])
                  if event == "streams_stats" else
                  "checkpoints {:,} in {:,} db transactions, {:,} usage transactions; largest fetched batch {:.1f} MB"
                  .format(b["applied"] - a["applied"], b.get("apply_transactions", 0) - a.get("apply_transactions", 0),
                          b["transactions"] - a["transactions"], b.get("batch_bytes_max", 0) / 1e6))
        lines.append(f"    {log.stem:<16} over {window:4.0f} s: {steps}; {counts}")
    return lines


# -- processes ---------------------------------------------------------------------------------------------

def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def keep_logs(home: Path, copy_to: Path | None) -> None:
    """Copy the processes' logs to ``copy_to`` (when given) and print the tail of every log that has errors."""
    for log in sorted(home.glob("*.log")):
        text = log.read_text(errors="replace")
        if copy_to:
            copy_to.mkdir(parents=True, exist_ok=True)
            (copy_to / log.name).write_text(text)
        if "Traceback" in text or '"level": "error"' in text:
            print(f"\n--- {log.name} (errors) ---\n" + "\n".join(text.splitlines()[-15:]))


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def warm_up(producer: LoadProducer, watcher_db: str, topic: str, timeout_s: float) -> None:
    """One message per partition, then wait until the ledger applied them all (workers seeded, ledger up)."""
    sent = Sent()
    for p in range(USAGE_PARTITIONS):
        subject = producer.subjects[p][0]
        producer._send(sent, p, orjson.dumps({"specversion": "1.0", "id": f"warm-{p}", "source": "bench",
                                              "type": "llm.tokens", "subject": subject, "project": PROJECT,
                                              "data": {"tokens": 0}}), 1)
    assert producer.producer.flush(60) == 0
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(libpq_url(watcher_db), autocommit=True) as conn:
        while time.monotonic() < deadline:
            applied = dict(conn.execute("SELECT partition, applied_through FROM applied_offsets "
                                        "WHERE source_topic = %s", (topic,)).fetchall())
            if all(applied.get(p, -1) >= o for p, o in sent.last_offset.items()):
                return
            time.sleep(0.1)
    raise SystemExit("warm-up: the pipeline did not apply one message per partition in time; see the logs")


def settle(database_url: str, *, timeout_s: float = 120.0, outbox: bool = True) -> str:
    """Wait until the previous phase's after-work is done: the ledger's outbox relay has published every row
    (``outbox``: a bench without a ledger process has nobody to publish them) and no (auto)vacuum runs in the bench
    database. Without this the latency phase's first ~12 s measured the throughput phase's aftermath (60 s of
    overload leave ~100k outbox rows and freshly dirtied tables behind), not a pipeline at 20,000 events/s. Returns
    what was waited for, printed with the phase."""
    started = time.monotonic()
    first: tuple[int, int] | None = None
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        while time.monotonic() - started < timeout_s:
            unpublished = (conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]
                           if outbox else 0)
            vacuums = conn.execute("SELECT count(*) FROM pg_stat_progress_vacuum WHERE datname = current_database()"
                                   ).fetchone()[0]
            first = first or (unpublished, vacuums)
            if unpublished == 0 and vacuums == 0:
                break
            time.sleep(0.5)
    assert first is not None
    waited = f"{first[0]:,} outbox rows unpublished, " if outbox else ""
    return f"settled in {time.monotonic() - started:.1f} s (at start: {waited}{first[1]} vacuums running)"


def run_pipeline_phase(name: str, producer: LoadProducer, eng: Engines, topic: str, groups: dict[str, list[int]],
                       *, seconds: float, rate: float, backlog_max: int, profile_dir: Path | None = None
                       ) -> dict[str, Any]:
    sent = Sent()
    # the Python processes of the pipeline, sampled while the producer sends (py-spy, non-blocking)
    samplers = {group: (profile_stacks.record(pids[0], seconds, profile_dir / f"{name}-{group}.txt"),
                        profile_dir / f"{name}-{group}.txt")
                for group, pids in groups.items()
                if profile_dir is not None and pids and group.startswith(("streams-", "ledger"))}
    rows_before = ledger_rows(eng.database_url)
    checkpoints_before = pg_checkpoints(eng.database_url)
    watcher = AppliedWatcher(eng.database_url, topic, sent).start()
    charges = topic.removesuffix(TOPIC_USAGE_EVENTS) + TOPIC_LEDGER_CHARGES
    with CheckpointWatcher(eng.bootstrap, charges, partitions=CHARGES_PARTITIONS) as checkpoints, \
            Meter({**groups, "producer (bench)": [os.getpid()]},
                  relist={"postgresql": lambda: postgres_pids(eng.pg_dir)} if eng.pg_dir else None) as meter:
        t0 = time.time()
        producer.run(sent, seconds=seconds, rate=rate, tag=name, backlog=lambda: watcher.applied_events,
                     backlog_max=backlog_max if rate == 0 else 0)
        produced_s = time.time() - t0
        complete = watcher.wait_all(timeout_s=max(60.0, seconds * 3))
    watcher.stop()
    rows_after = ledger_rows(eng.database_url)
    pg_checkpoints_during = pg_checkpoints(eng.database_url) - checkpoints_before
    wall = max(watcher.last_applied_at - sent.first_sent, 1e-3)
    applied_events = sum(n for _, n in watcher.latencies)
    return {"name": name, "sent": sent, "complete": complete, "wall_s": wall, "produced_s": produced_s,
            "applied_events": applied_events, "events_per_s": applied_events / wall, "produce_rate": sent.events / produced_s,
            "p50_s": watcher.percentile(0.50), "p99_s": watcher.percentile(0.99),
            "max_s": max((lat for lat, _ in watcher.latencies), default=float("nan")),
            "windows": watcher.windows(), "stages": stage_latencies(watcher.applied, checkpoints.seen),
            "pg_checkpoints": pg_checkpoints_during,
            "tx_rows": rows_after[0] - rows_before[0], "meter": meter,
            "profiles": {group: profile_stacks.collect(sampler, out) for group, (sampler, out) in samplers.items()}}


def pg_insert_limit(database_url: str, *, rows: int, batch_rows: int = 10_000) -> str:
    """PostgreSQL's set-based insert rate on this machine and server, in the same run as the pipeline: ``rows``
    ledger-shaped rows (bigint id, text wallet, bigint amount, timestamptz, jsonb) into a logged scratch table,
    ``batch_rows`` per committed transaction — once as one ``INSERT … SELECT FROM unnest(arrays)`` per batch
    (what the ledger's statements do) and once with ``COPY`` (the bulk ceiling)."""
    table = f"bench_insert_{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    batches = [list(range(start, min(start + batch_rows, rows))) for start in range(0, rows, batch_rows)]
    figures = []
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, wallet_id text NOT NULL, "
                     "amount_minor bigint NOT NULL, created_at timestamptz NOT NULL, metadata jsonb NOT NULL)")
        conn.commit()
        try:
            for method in ("unnest", "copy"):
                conn.execute(f"TRUNCATE {table}")
                conn.commit()
                started = time.monotonic()
                for ids in batches:
                    wallets = [f"wal_{i % 100_000}" for i in ids]
                    amounts = [i % 997 for i in ids]
                    if method == "unnest":
                        conn.execute(f"INSERT INTO {table} SELECT id, w, a, %s, '{{}}'::jsonb "
                                     "FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) AS t(id, w, a)",
                                     (now, ids, wallets, amounts))
                    else:
                        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                            for i, w, a in zip(ids, wallets, amounts, strict=True):
                                copy.write_row((i, w, a, now, "{}"))
                    conn.commit()
                figures.append(f"{method} {rows / (time.monotonic() - started):,.0f} rows/s")
        finally:
            conn.rollback()
            conn.execute(f"DROP TABLE {table}")
            conn.commit()
    return (f"PostgreSQL set-based insert, {rows:,} ledger-shaped rows in committed batches of {batch_rows:,}: "
            + "; ".join(figures))


def raw_limits(bootstrap: str, prefix: str, *, messages: int) -> str:
    """The clients' and broker's physical limits at one event per message, on this machine and this broker: a
    plain confluent producer (same settings and message building as ``--pack 1``) as fast as it can into a scratch
    topic of the same partitions, until every message is acknowledged; then one confluent consumer reading them
    all with ``consume(num_messages=10,000)`` (no work per message)."""
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"{prefix}raw.limits"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=USAGE_PARTITIONS, replication_factor=1)]).values():
        future.result(15)
    producer = Producer({"bootstrap.servers": bootstrap, **PLAIN_CLIENT})
    rng = random.Random(7)
    now_iso = datetime.now(UTC).isoformat()
    started = time.monotonic()
    for i in range(messages):
        subject = f"user-{rng.randrange(1_000)}"
        value = orjson.dumps({"specversion": "1.0", "id": f"raw-{i}", "source": "bench", "type": "llm.tokens",
                              "subject": subject, "project": PROJECT, "time": now_iso,
                              "data": {"tokens": rng.randint(1, 100)}})
        while True:
            try:
                producer.produce(topic, value=value, key=subject.encode())
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1_000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0
    produce_s = time.monotonic() - started
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}raw", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 50, "fetch.queue.backoff.ms": 10})
    consumer.subscribe([topic])
    got = 0
    first = 0.0
    deadline = time.monotonic() + 120
    while got < messages and time.monotonic() < deadline:
        batch = consumer.consume(num_messages=10_000, timeout=1.0)
        if batch and not first:
            first = time.monotonic()
        got += sum(1 for m in batch if m.error() is None)
    consume_s = max(time.monotonic() - first, 1e-9) if first else float("nan")
    consumer.close()
    return (f"raw confluent limits, one event per message, {messages:,} messages: produce (acks=all, murmur2 keyed) "
            f"{messages / produce_s:,.0f} msg/s; consume (consume(num_messages=10,000), from the first batch) "
            f"{got / consume_s:,.0f} msg/s ({got:,} read)")


def run_baseline(eng: Engines, home: Path, *, events: int, workers: int, timeout_s: float) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:6]}."
    topic = f"{prefix}baseline.usage"
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": eng.bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=USAGE_PARTITIONS, replication_factor=1)]).values():
        future.result(15)
    # one event per message, keyed by subject (what the faust docs' examples do)
    producer = Producer({"bootstrap.servers": eng.bootstrap, "linger.ms": 5, "compression.type": "lz4",
                         "queue.buffering.max.kbytes": 262_144})
    rng = random.Random(5)
    now_iso = datetime.now(UTC).isoformat()
    expected = 0
    for i in range(events):
        subject = f"user-{rng.randrange(10_000)}"
        tokens = rng.randint(1, 100)
        expected += tokens
        value = orjson.dumps({"id": f"b-{i}", "source": "bench", "type": "llm.tokens", "subject": subject,
                              "project": PROJECT, "time": now_iso, "data": {"tokens": tokens}})
        while True:
            try:
                producer.produce(topic, value=value, key=subject.encode(), partition=partition_for(subject, USAGE_PARTITIONS))
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(120) == 0
    procs = []
    progress = [home / f"baseline-{i}.progress" for i in range(workers)]
    for i in range(workers):
        procs.append(start([sys.executable, "-m", "bench.pipeline_baseline"],
                           {"BASELINE_APP_ID": f"{prefix}baseline", "BASELINE_TOPIC": topic,
                            "BASELINE_BROKER": eng.bootstrap, "BASELINE_PROGRESS": str(progress[i]),
                            "BASELINE_PARTITIONS": str(USAGE_PARTITIONS)}, home / f"baseline-{i}.log"))
    try:
        first_progress = None
        done = 0
        with Meter({"baseline workers": [p.pid for p in procs]}) as meter:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                done = sum(int(p.read_text() or 0) for p in progress if p.exists())
                if done and first_progress is None:
                    first_progress = time.time()
                if done >= events:
                    break
                if any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.1)
            finished = time.time()
        wall = max(finished - (first_progress or finished), 1e-3)
        if done < events:
            for i in range(workers):
                log = home / f"baseline-{i}.log"
                if log.exists():
                    print(f"--- baseline-{i}.log ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return {"events": events, "done": done, "wall_s": wall, "events_per_s": done / max(wall, 1e-9),
                "meter": meter}
    finally:
        stop(procs)


def prepare_stack(eng: Engines) -> tuple[dict[str, str], str]:
    """Topics (fresh prefix), migrations and the bench meter + price; returns the processes' environment and the
    usage topic (bench/soak.py starts the same stack)."""
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    ensure_topics(eng.bootstrap, topic_specs(prefix=prefix, usage_partitions=USAGE_PARTITIONS,
                                             charges_partitions=CHARGES_PARTITIONS, transactions_partitions=4))
    migrate(eng.database_url)
    engine = make_engine(eng.database_url, pool_size=1)
    with engine.begin() as conn:
        catalog.create_meter(conn, project_id=PROJECT, slug="tokens", event_type="llm.tokens",
                             aggregation="SUM", value_property="$.tokens")
        catalog.create_price(conn, project_id=PROJECT, meter="tokens",
                             model={"model": "per_unit", "unit_price_minor": str(PRICE)},
                             effective_from=datetime(2020, 1, 1, tzinfo=UTC))
    engine.dispose()
    env = {"DATABASE_URL": eng.database_url, "KAFKA_BOOTSTRAP_SERVERS": eng.bootstrap,
           "METERLINE_TOPIC_PREFIX": prefix, "METERLINE_ENV": "local", "METERLINE_LOG_LEVEL": "INFO",
           "LEDGER_CONSUMER_GROUP": f"{prefix}ledger"}
    return env, f"{prefix}{TOPIC_USAGE_EVENTS}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each pipeline phase")
    parser.add_argument("--rate", type=float, default=20_000.0, help="events/s of the latency phase")
    parser.add_argument("--pack", type=int, default=200, help="events per packed message")
    parser.add_argument("--subjects", type=int, default=1_000, help="distinct subjects (wallets) active in the run")
    parser.add_argument("--workers", type=int, default=2, help="streams worker processes")
    parser.add_argument("--ledgers", type=int, default=1,
                        help="ledger consumer processes (one consumer group: the charges partitions split between them)")
    parser.add_argument("--baseline-events", type=int, default=0,
                        help="events for the naive baseline (0 = as many as phase 1 sent, capped at 300k)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--raw-messages", type=int, default=300_000,
                        help="one-event messages for the raw confluent produce/consume limits first (0 = skip)")
    parser.add_argument("--pg-rows", type=int, default=200_000,
                        help="rows for the PostgreSQL set-based insert limit first (0 = skip)")
    parser.add_argument("--backlog", type=int, default=100_000,
                        help="throughput phase: most events sent but not yet applied")
    parser.add_argument("--settle-interval-s", type=float, default=0.0,
                        help="the ledger's LEDGER_USAGE_SETTLE_INTERVAL_S: > 0 prices usage at once and posts it "
                             "in a settle pass this often (balances checked as balance − unsettled, then once "
                             "everything is settled, as posted)")
    parser.add_argument("--logs", type=Path, default=None, help="copy the processes' logs here")
    parser.add_argument("--profile", action="store_true",
                        help="sample the streams workers and the ledger with py-spy during each phase and print "
                             "where their time went (by package and hottest functions)")
    parser.add_argument("--client", choices=PLAIN_CLIENTS, default="idempotent",
                        help="the load producer's settings: idempotent (Java's default) or librdkafka's defaults "
                             "(no idempotence, no bound on requests in flight)")
    parser.add_argument("--broker-storage", choices=("disk", "memory"), default="disk",
                        help="embedded broker: topics on disk (what `meterline up` runs) or in memory")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # run the cleanups

    print(describe())
    print("load average at start: {:.2f} {:.2f} {:.2f} (the machine is shared; other load skews every figure)"
          .format(*os.getloadavg()))
    print(f"cores: {os.cpu_count()}, usage partitions: {USAGE_PARTITIONS}, streams workers: {args.workers}, "
          f"ledger consumers: {args.ledgers}, pack: {args.pack} events/message, subjects: {args.subjects}, "
          f"load producer: {args.client}, "
          f"embedded broker storage: {args.broker_storage} (batches merged after "
          f"{StackSettings().broker_merge_after_s:g} s, again after {StackSettings().broker_merge_big_after_s:g} s; "
          "0 = never), streams consumer: "
          f"{os.environ.get('STREAMS_CONSUMER', 'confluent (default)')}")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        home = Path(tmp)
        with engines(home, broker_storage=args.broker_storage) as eng:
            if args.raw_messages:
                print(raw_limits(eng.bootstrap, f"raw{uuid.uuid4().hex[:6]}.", messages=args.raw_messages))
            env, topic = prepare_stack(eng)
            env["LEDGER_USAGE_SETTLE_INTERVAL_S"] = str(args.settle_interval_s)
            if args.pg_rows:
                print(pg_insert_limit(eng.database_url, rows=args.pg_rows))
            workers = [start([sys.executable, "-m", "meterline", "run", "streams"],
                             {**env, "STREAMS_WORKER_INDEX": str(i)}, home / f"streams-{i}.log")
                       for i in range(args.workers)]
            ledgers = [start([sys.executable, "-m", "meterline", "run", "ledger"], env,
                             home / ("ledger.log" if i == 0 else f"ledger-{i}.log"))
                       for i in range(args.ledgers)]
            procs = [*workers, *ledgers]
            groups = {f"streams-{i}": [w.pid] for i, w in enumerate(workers)}
            groups["ledger"] = [ledger.pid for ledger in ledgers]
            if eng.broker_pid:
                groups["broker (tansu)"] = [eng.broker_pid]
            if eng.store_pid:
                groups["broker disk store"] = [eng.store_pid]
                # its merge worker (meterline/merge_worker.py, spawned at the store's start)
                with contextlib.suppress(psutil.Error):
                    groups["store merges"] = [c.pid for c in psutil.Process(eng.store_pid).children(recursive=True)]
            groups["postgresql"] = postgres_pids(eng.pg_dir)
            try:
                producer = LoadProducer(eng.bootstrap, topic, subjects=args.subjects, pack=args.pack, seed=1,
                                        client=args.client)
                warm_up(producer, eng.database_url, topic, timeout_s=90)
                groups["postgresql"] = postgres_pids(eng.pg_dir)  # backends of the workers exist now
                results = []
                for name, rate in (("throughput", 0.0), ("latency", args.rate)):
                    settled = settle(eng.database_url)
                    result = run_pipeline_phase(name, producer, eng, topic, groups, seconds=args.seconds, rate=rate,
                                                backlog_max=args.backlog, profile_dir=home if args.profile else None)
                    ok, detail = check_totals(eng.database_url, [r["sent"] for r in [*results, result]],
                                              complete=result["complete"] and all(r["complete"] for r in results))
                    result["exact"], result["exact_detail"] = ok, detail
                    results.append(result)
                    label = (f"as fast as the pipeline absorbs (at most {args.backlog:,} events unapplied)"
                             if rate == 0 else f"open loop at {rate:,.0f} events/s")
                    print(f"\n[{name}] {label} for {args.seconds:.0f} s; before it: {settled}")
                    print(f"  produced {result['sent'].events:,} events in {result['sent'].messages:,} messages "
                          f"({result['produce_rate']:,.0f} events/s offered)")
                    print(f"  end to end (sent -> applied in the ledger): {result['events_per_s']:,.0f} events/s "
                          f"({result['applied_events']:,} events over {result['wall_s']:.1f} s); "
                          f"all applied: {result['complete']}")
                    print(f"  event -> balance latency: p50 {1000 * result['p50_s']:.0f} ms, "
                          f"p99 {1000 * result['p99_s']:.0f} ms, max {1000 * result['max_s']:.0f} ms")
                    print("  " + result["stages"].line())
                    print("  p50/p99 ms per 10 s of send time: " + ", ".join(
                        f"{start}s {1000 * p50:.0f}/{1000 * p99:.0f}" for start, p50, p99 in result["windows"]))
                    print(f"  ledger: {result['tx_rows']:,} transaction rows, "
                          f"{result['tx_rows'] / result['wall_s']:,.0f} rows/s; PostgreSQL checkpoints during "
                          f"the phase: {result['pg_checkpoints']}")
                    print(f"  exact totals: {'OK' if ok else 'WRONG'} ({detail})")
                    print("  processes:")
                    print("\n".join(result["meter"].report(result["wall_s"])))
                    if result["profiles"]:
                        print(f"  profile (py-spy, {args.seconds:.0f} s of sending, innermost frame per sample):")
                    for group, summary in result["profiles"].items():
                        for i, line in enumerate(summary.lines() if isinstance(summary, StackSummary) else [summary]):
                            print(f"    {group if i == 0 else '':<16} {line}")
                    time.sleep(10.5)  # one more stats line of every process covers the phase's end
                    steps = where_time_went(home, result["sent"].first_sent, time.time())
                    if steps:
                        print("  where the time went (per-step seconds from the stats logs, share of the window):")
                        print("\n".join(steps))
                if args.settle_interval_s > 0:
                    waited = wait_settled(eng.database_url, timeout_s=3 * args.settle_interval_s + 60)
                    ok, detail = check_totals(eng.database_url, [r["sent"] for r in results],
                                              complete=all(r["complete"] for r in results), posted_only=True)
                    results[-1]["exact"] = results[-1]["exact"] and ok
                    print(f"\n[settled] every key posted {waited:.1f} s after the last phase; posted balances "
                          f"exact: {'OK' if ok else 'WRONG'} ({detail})")
            finally:
                stop(procs)
                keep_logs(home, args.logs)
            if not args.skip_baseline:
                n = args.baseline_events or min(results[0]["sent"].events, 300_000)
                print(f"\n[baseline] naive faust (one event per message, faust.Record, table += per event), "
                      f"{args.workers} workers, {n:,} events pre-produced")
                base = run_baseline(eng, home, events=n, workers=args.workers, timeout_s=max(120.0, n / 1_000))
                print(f"  consumed {base['done']:,}/{base['events']:,} events in {base['wall_s']:.1f} s: "
                      f"{base['events_per_s']:,.0f} events/s (no ledger, no exactly-once protocol)")
                print("\n".join(base["meter"].report(base["wall_s"])))
                ratio = results[0]["events_per_s"] / max(base["events_per_s"], 1e-9)
                print(f"\nratio: Meterline end to end {results[0]['events_per_s']:,.0f} events/s vs naive "
                      f"{base['events_per_s']:,.0f} events/s = {ratio:.1f}x")
            lat = results[1]
            bar = lat["events_per_s"] >= 20_000 * 0.97 and lat["p99_s"] <= 1.0 and lat["complete"]
            print(f"\nfirst bar (>= 20,000 events/s with p99 <= 1 s): "
                  f"{'MET' if bar and results[0]['events_per_s'] >= 20_000 else 'NOT MET'} "
                  f"(throughput {results[0]['events_per_s']:,.0f}/s; at {args.rate:,.0f}/s p99 "
                  f"{1000 * lat['p99_s']:.0f} ms)")
            print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
            if not all(r["exact"] for r in results):
                raise SystemExit(1)


if __name__ == "__main__":
    main()
