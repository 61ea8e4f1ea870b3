"""Benchmark apply_checkpoint: checkpoints/s and usage rows/s against a real PostgreSQL.

    .venv/bin/python -m bench.ledger_apply [--keys 500] [--wallets 10000] [--seconds 30] [--dedupe-per-key 1] [--merge 4]
                                           [--together 8] [--statements] [--settle-later] [--table-stats]

Uses DATABASE_URL when set (a scratch database is created next to it and dropped after), otherwise starts
the embedded PostgreSQL in a temporary directory. Each checkpoint carries ``--keys`` counters (random
wallets out of ``--wallets``, one meter, per-unit price 0.4), every value cumulative and growing, so each
key posts a usage transaction that burns a bucket; a phase with two appliers on different partitions
sharing the wallets follows, then (``--merge N`` > 1) one applier applying N consecutive checkpoints per
transaction with ``apply_checkpoints`` — what the ledger consumer does with a backlog — and (``--together N`` > 1)
one applier applying one checkpoint of each of N partitions per transaction with ``apply_partitions`` — what the
consumer does with small checkpoints (each partition draws from its own slice of the wallets). Bounded by
``--seconds`` in total. ``--statements``: where one applier's time goes — each SQL statement's time (sent →
result read, so the server's work plus transfer) and the Python between them, in µs per posting, measured over
the first phase (and the ``--together`` phase). ``--settle-later``: usage is priced and left for the settle pass
(``LEDGER_USAGE_SETTLE_INTERVAL_S`` > 0, ledger/settle.py); the figures are then per key applied, and a last step
times the settle pass posting everything (with ``--statements``, statement by statement too). ``--table-stats``: the
rows each table inserted and updated, and how many updates were HOT (in place, no index entry written), from
``pg_stat_user_tables`` at the end. The heap and the collector are set up as in ``meterline run ledger`` (ledger/runtime.py)."""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

from bench.machine import describe
from ledger.checkpoints import apply_partitions
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel, TransactionKind
from ledger.db import libpq_url, make_engine, sqlalchemy_url
from ledger.known_wallets import KnownWallets
from ledger.postings import NewBucket, WalletBook
from ledger.rows import WalletRow
from ledger.runtime import freeze_startup_heap, tune_gc_for_batches
from ledger.schema_migrations import upgrade
from ledger.settle import SETTLE_KEYS_MAX, settle_all
from ledger.writer import Draft, write

PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PRICE_FROM = datetime(2020, 1, 1, tzinfo=UTC)
MIGRATIONS = Path(__file__).resolve().parent.parent / "ledger" / "migrations"


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    import os

    base = os.environ.get("DATABASE_URL")
    with contextlib.ExitStack() as stack:
        if not base:
            from meterline import services

            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ledger-")))
            base = services.start_embedded_postgres(home / "postgres")
            stack.callback(services.stop_embedded_postgres, home / "postgres")
        name = f"bench_ledger_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(libpq_url(base), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(sqlalchemy_url(base)).set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            with psycopg.connect(libpq_url(base), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(engine: Engine, wallets: int) -> None:
    """Wallets with one 10^9-credit top-up each, written through the ledger's own set-based writer."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO wallets (id, project_id, owner_kind, owner_ref)
            SELECT 'w' || i, 'bench', 'subject', 'w' || i FROM generate_series(0, :n - 1) AS i
        """), {"n": wallets})
        rows = conn.execute(text("SELECT * FROM wallets")).mappings().all()
        books = {r["id"]: WalletBook(balance_minor=0, buckets=[], now=now, project_id="bench") for r in rows}
        drafts = [Draft(wallet_id=w.id, project_id="bench", kind=TransactionKind.TOP_UP, posting=books[w.id].credit(
                        10**9, NewBucket("top_up", 100)), idempotency_key=f"seed:{w.id}")
                  for w in (WalletRow.from_mapping(r) for r in rows)]
        write(conn, books, drafts)


class Load:
    """Cumulative counters per (partition, wallet), growing with every checkpoint."""

    def __init__(self, *, wallets: int, keys: int, partition: int, seed_: int, topic: str,
                 dedupe_per_key: int = 1, first_wallet: int = 0) -> None:
        self.rng = random.Random(seed_)
        self.first_wallet = first_wallet
        self.dedupe_per_key = dedupe_per_key
        self.wallets, self.keys, self.partition = wallets, keys, partition
        self.units: dict[str, int] = {}
        self.offset = 0
        self.topic = topic

    def next(self) -> ChargeCheckpoint:
        self.offset += 2_000  # one checkpoint per take_events(2000) batch in streams
        counters = []
        for index in self.rng.sample(range(self.wallets), self.keys):
            wallet = f"w{self.first_wallet + index}"
            self.units[wallet] = self.units.get(wallet, 0) + self.rng.randint(1, 50)
            counters.append(CounterValue(
                key=CounterKey(wallet_id=wallet, project_id="bench", meter_id="tokens", period_start=PERIOD,
                               price_version_id="v1"),
                units=Decimal(self.units[wallet]), price=PRICE, events=self.units[wallet],
                price_effective_from=PRICE_FROM))  # what streams sends since issue 13: continued pricing
        return ChargeCheckpoint(source_topic=self.topic, partition=self.partition, as_of_offset=self.offset,
                                counters=counters,
                                dedupe_keys=[self.rng.getrandbits(63) for _ in range(self.keys * self.dedupe_per_key)],
                                emitted_at=datetime.now(UTC))


class StatementTimes:
    """Client-side time per SQL statement (its first 60 characters), summed, while installed on an engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}

    def __enter__(self) -> StatementTimes:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, *_args: Any) -> None:
        self._started[id(conn)] = time.perf_counter()

    def _after(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seconds[" ".join(statement.split())[:60]] += time.perf_counter() - self._started.pop(id(conn))

    def report(self, postings: int, wall_s: float, cpu_s: float) -> None:
        if not postings:
            return
        sql = sum(self.seconds.values())
        print(f"  where one applier's time went, µs per posting ({postings:,} postings): wall {wall_s * 1e6 / postings:.0f}"
              f" = SQL statements {sql * 1e6 / postings:.0f} + Python between them {(wall_s - sql) * 1e6 / postings:.0f}"
              f" (process CPU {cpu_s * 1e6 / postings:.0f}, incl. the driver)")
        for statement, seconds in sorted(self.seconds.items(), key=lambda item: -item[1])[:12]:
            print(f"    {seconds * 1e6 / postings:6.1f}  {statement}")


#: ``--settle-later``: apply with ``settle_later`` (the cost per key is then the apply alone; see main)
SETTLE_LATER = False
#: the (wallet, project) pairs step 2 skips, shared by the appliers as the consumer's apply threads share theirs
KNOWN_WALLETS: KnownWallets | None = KnownWallets()


def run_applier(engine: Engine, loads: list[Load], deadline: float, out: list[tuple[float, int, int]],
                merge: int) -> None:
    """One transaction per turn: ``merge`` consecutive checkpoints of one partition (``apply_checkpoints``), or
    one checkpoint of each of several partitions (``loads``: ``apply_partitions``, the consumer's combined apply)."""
    while time.monotonic() < deadline and len(out) < 100_000:
        if len(loads) > 1:
            batch = [[load.next()] for load in loads]
        else:
            batch = [[loads[0].next() for _ in range(merge)]]
        n = sum(len(b) for b in batch)
        started = time.perf_counter()
        with engine.begin() as conn:  # one partition's merged checkpoints, or several partitions: apply_partitions
            outcomes = [m.outcome for m in apply_partitions(conn, batch, settle_later=SETTLE_LATER,
                                                            known_wallets=KNOWN_WALLETS)]
        elapsed = time.perf_counter() - started
        keys, transactions = sum(o.keys for o in outcomes), sum(o.transactions for o in outcomes)
        if SETTLE_LATER:  # what would have been a posting is an accrued key: count it as one (µs per posting)
            transactions = keys
        out.extend([(elapsed / n, keys // n, transactions // n)] * n)


def phase(engine: Engine, *, appliers: int, wallets: int, keys: int, seconds: float, dedupe_per_key: int = 1,
          merge: int = 1, together: int = 1, statements: bool = False) -> None:
    if statements:
        cpu_started = time.process_time()
        with StatementTimes(engine) as times:
            flat = _phase(engine, appliers=appliers, wallets=wallets, keys=keys, seconds=seconds,
                          dedupe_per_key=dedupe_per_key, merge=merge, together=together)
        times.report(sum(r[2] for r in flat), sum(r[0] for r in flat), time.process_time() - cpu_started)
    else:
        _phase(engine, appliers=appliers, wallets=wallets, keys=keys, seconds=seconds, dedupe_per_key=dedupe_per_key,
               merge=merge, together=together)


def _phase(engine: Engine, *, appliers: int, wallets: int, keys: int, seconds: float, dedupe_per_key: int,
           merge: int, together: int = 1) -> list[tuple[float, int, int]]:
    deadline = time.monotonic() + seconds
    results: list[list[tuple[float, int, int]]] = [[] for _ in range(appliers)]
    topic = f"bench.usage.{appliers}.{merge}.{together}"
    if together > 1:  # one applier, each partition its own slice of the wallets (a wallet lives in one partition)
        share = wallets // together
        loads = [[Load(wallets=share, keys=keys, partition=p, seed_=p, topic=topic, dedupe_per_key=dedupe_per_key,
                       first_wallet=p * share) for p in range(together)]]
    else:
        loads = [[Load(wallets=wallets, keys=keys, partition=p, seed_=p, topic=topic, dedupe_per_key=dedupe_per_key)]
                 for p in range(appliers)]
    threads = [threading.Thread(target=run_applier, args=(engine, loads[a], deadline, results[a], merge))
               for a in range(len(loads))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    flat = [r for rs in results for r in rs]
    latencies = sorted(r[0] * 1000 for r in flat)
    checkpoints = len(flat)
    rows = sum(r[1] for r in flat)
    transactions = sum(r[2] for r in flat)
    p95 = latencies[int(len(latencies) * 0.95) - 1] if latencies else 0.0
    merged = f", {merge} merged per transaction (cost per checkpoint = transaction / {merge})" if merge > 1 else ""
    if together > 1:
        merged = f", {together} partitions per transaction (cost per checkpoint = transaction / {together})"
    print(f"{appliers} applier(s), {keys} keys/checkpoint{merged}: {checkpoints} checkpoints in {elapsed:.1f} s = "
          f"{checkpoints / elapsed:,.1f} checkpoints/s, {rows / elapsed:,.0f} usage rows/s, "
          f"{transactions / elapsed:,.0f} transactions/s; per checkpoint median "
          f"{statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms; "
          f"≈ {checkpoints * 2000 / elapsed:,.0f} events/s if each checkpoint covers 2,000 events")
    return flat


def print_table_stats(engine: Engine) -> None:
    """Rows inserted / updated / updated in place (HOT) per table over the whole run; the statistics collector
    reports a backend's counts when it goes idle, so wait a little for the last ones."""
    time.sleep(1.5)
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
            WHERE n_tup_ins + n_tup_upd > 0 ORDER BY n_tup_ins + n_tup_upd DESC
        """)).all()
    print("table stats (pg_stat_user_tables): table, rows inserted, rows updated, of which HOT")
    for table, inserted, updated, hot in rows:
        share = f" ({100 * hot / updated:.0f}%)" if updated else ""
        print(f"    {table:28} {inserted:>10,} {updated:>10,} {hot:>10,}{share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="total measuring time (split over phases)")
    parser.add_argument("--dedupe-per-key", type=int, default=1,
                        help="dedupe keys per counter (the pipeline bench carries ~5 events per key per checkpoint)")
    parser.add_argument("--settle-later", action="store_true",
                        help="price usage and leave it for the settle pass, then time the pass (ledger/settle.py)")
    parser.add_argument("--ensure-every-wallet", action="store_true",
                        help="step 2 checks every wallet of every application (no KnownWallets, as before 2026-12-07)")
    parser.add_argument("--merge", type=int, default=4, help="checkpoints merged per transaction in the last phase")
    parser.add_argument("--together", type=int, default=1,
                        help="a last phase: one applier applying one checkpoint of each of N partitions per transaction "
                             "(apply_partitions, what the consumer does with small checkpoints); the wallets are "
                             "split between the partitions")
    parser.add_argument("--table-stats", action="store_true",
                        help="print each table's inserted / updated / HOT-updated rows at the end")
    parser.add_argument("--statements", action="store_true",
                        help="print the time per SQL statement and the Python between them (first phase)")
    args = parser.parse_args()
    global SETTLE_LATER, KNOWN_WALLETS
    SETTLE_LATER = args.settle_later
    if args.ensure_every_wallet:
        KNOWN_WALLETS = None
    if args.keys > args.wallets // max(1, args.together):
        parser.error(f"--keys {args.keys} is more than each partition's {args.wallets // max(1, args.together):,} "
                     f"wallets (--wallets / --together): raise --wallets or lower --keys")
    print(describe())
    with scratch_database() as url:
        upgrade(url, script_location=MIGRATIONS, version_table="alembic_version_ledger")
        engine = make_engine(url, pool_size=4, application_name="bench-ledger")
        seed(engine, args.wallets)
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
        print(f"PostgreSQL {version}; {args.wallets:,} wallets seeded")
        freeze_startup_heap()  # as `meterline run ledger` does
        tune_gc_for_batches()
        share = 1 / (2 + (args.merge > 1) + (args.together > 1))
        common = {"wallets": args.wallets, "keys": args.keys, "seconds": args.seconds * share,
                  "dedupe_per_key": args.dedupe_per_key}
        phase(engine, appliers=1, statements=args.statements, **common)
        phase(engine, appliers=2, **common)
        if args.merge > 1:
            phase(engine, appliers=1, merge=args.merge, **common)
        if args.together > 1:
            phase(engine, appliers=1, together=args.together, statements=args.statements, **common)
        if args.settle_later:
            started, cpu_started = time.perf_counter(), time.process_time()
            with StatementTimes(engine) if args.statements else contextlib.nullcontext() as times:
                settled = settle_all(engine)
            elapsed = time.perf_counter() - started
            if times is not None:
                times.report(settled.keys, elapsed, time.process_time() - cpu_started)
            print(f"settle pass: {settled.keys:,} keys of {settled.wallets:,} wallets posted in {elapsed:.1f} s = "
                  f"{elapsed * 1e6 / max(settled.keys, 1):.0f} µs per posting ({SETTLE_KEYS_MAX:,} keys per transaction)")
        with engine.connect() as conn:
            broken = conn.execute(text("""
                SELECT count(*) FROM usage_charges ch
                WHERE ch.charged_minor <> (SELECT -coalesce(sum(amount_minor), 0) FROM transactions t
                                           WHERE t.wallet_id = ch.wallet_id AND t.kind = 'usage')
            """)).scalar_one()
        print(f"check: keys whose posted usage differs from the charged cumulative: {broken}")
        if args.table_stats:
            print_table_stats(engine)
        engine.dispose()


if __name__ == "__main__":
    main()
