"""Benchmark the replay/verify/export tools of issue 18 against real engines.

    .venv/bin/python -m bench.replay_verify_export [--transactions 100000] [--wallets 2000] [--events 100000]
        [--only chain|export|replay ...] [--replay-timeout 1800]

1. chain trigger cost: ``--transactions`` rows inserted in one set-based statement (wallet by wallet in id order,
   as the writers do) with the ``transactions_chain`` trigger, and the same number with it disabled;
2. ``meterline ledger verify`` (ledger/chain.py) over those rows: seconds, and per 1M transactions extrapolated
   linearly (verify streams rows, its cost is per row);
3. ``meterline export`` (ledger/exports.py) of the transactions as CSV and Parquet: rows/s;
4. ``meterline replay`` (meterline/cli_replay.py ``run_replay``) end to end over ``--events`` events on the
   embedded broker (packed 200 per message, 8 partitions), the ledger's marks set to the last offsets: events/s
   and the peak RSS of generating + producing and of the replay (both stream: neither grows with ``--events``).

Uses DATABASE_URL when set (a scratch database next to it), otherwise the embedded PostgreSQL; always an embedded
broker on a free port. Bounded: every phase is sized by its argument (defaults run in well under a minute)."""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from sqlalchemy import Engine, text

from bench.ledger_apply import scratch_database
from bench.machine import describe
from bench.rss import PeakRss
from ledger.chain import verify
from ledger.db import make_engine
from ledger.exports import EXPORTS, encode, stream_rows

_INSERT = text("""
    INSERT INTO transactions (id, project_id, wallet_id, kind, amount_minor, balance_before_minor,
                              balance_after_minor, idempotency_key, created_at, chain_hash)
    SELECT nextval('transactions_id_seq'), 'bench', :prefix || (i % :w), 'top_up', 1, i / :w, i / :w + 1,
           :prefix || 'k' || i, now(), decode('00', 'hex')  -- replaced by the trigger when it is enabled
    FROM generate_series(0, :n - 1) AS i ORDER BY i % :w, i
""")


def _seed_wallets(engine: Engine, prefix: str, wallets: int, per_wallet: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO wallets (id, project_id, owner_kind, owner_ref, balance_minor)
            SELECT :prefix || i, 'bench', 'subject', :prefix || i, :b FROM generate_series(0, :w - 1) AS i
        """), {"prefix": prefix, "w": wallets, "b": per_wallet})
        conn.execute(text("""
            INSERT INTO credit_buckets (wallet_id, project_id, source, priority, granted_minor, remaining_minor)
            SELECT :prefix || i, 'bench', 'top_up', 100, :b, :b FROM generate_series(0, :w - 1) AS i
        """), {"prefix": prefix, "w": wallets, "b": per_wallet})


def chain_phase(engine: Engine, n: int, wallets: int) -> None:
    """Four inserts of n/4 rows into fresh wallets, alternating trigger off / on (the first insert into a fresh
    database is slower whatever it is: a fixed order would bias the comparison); the chained half stays."""
    per_wallet = n // 4 // wallets
    rows = per_wallet * wallets
    timings: dict[bool, list[float]] = {True: [], False: []}
    for prefix, chained in (("u1_", False), ("c1_", True), ("u2_", False), ("c2_", True)):
        _seed_wallets(engine, prefix, wallets, per_wallet)
        with engine.begin() as conn:
            if not chained:
                conn.execute(text("ALTER TABLE transactions DISABLE TRIGGER transactions_chain"))
            started = time.monotonic()
            conn.execute(_INSERT, {"prefix": prefix, "w": wallets, "n": rows})
            timings[chained].append(time.monotonic() - started)
            if not chained:
                conn.execute(text("ALTER TABLE transactions ENABLE TRIGGER transactions_chain"))
    with engine.begin() as conn:  # the unchained rows are not part of the verified ledger
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("DELETE FROM transactions WHERE wallet_id LIKE 'u%'"))
        conn.execute(text("DELETE FROM credit_buckets WHERE wallet_id LIKE 'u%'"))
        conn.execute(text("DELETE FROM wallets WHERE id LIKE 'u%'"))
    on = [t / rows * 1e6 for t in timings[True]]
    off = [t / rows * 1e6 for t in timings[False]]
    print(f"insert {rows:,} rows ({wallets:,} wallets) per statement, alternating: trigger disabled "
          f"{' / '.join(f'{x:.1f}' for x in off)} µs/row, chained {' / '.join(f'{x:.1f}' for x in on)} µs/row "
          f"→ the chain costs ≈ {sum(on) / 2 - sum(off) / 2:.1f} µs per posted row")
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            report = verify(conn)
    assert report.ok, report.breaks[:3]
    print(f"verify: {report.transactions:,} transactions of {report.wallets:,} wallets in {report.seconds:.2f} s "
          f"= {report.transactions / report.seconds:,.0f} tx/s → {report.seconds / report.transactions * 1e6:.1f} s "
          f"per 1M transactions (extrapolated linearly from this run)")


def export_phase(engine: Engine) -> None:
    since, until = datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1)
    spec = EXPORTS["transactions"]
    for fmt in ("csv", "parquet"):
        rows = 0
        size = 0

        def counted(n: int) -> None:
            nonlocal rows
            rows += n

        started = time.monotonic()
        with engine.connect() as conn, conn.begin():
            for chunk in encode(spec, stream_rows(conn, spec, since=since, until=until), fmt,
                                on_rows=counted):
                size += len(chunk)
        seconds = time.monotonic() - started
        print(f"export transactions as {fmt}: {rows:,} rows, {size / 2**20:.1f} MiB in {seconds:.2f} s "
              f"= {rows / seconds:,.0f} rows/s")


def produce_events(bootstrap: str, topic: str, *, events: int, partitions: int, pack: int = 200) -> dict[int, int]:
    """Produce ``events`` synthetic events packed ``pack`` per message, generated as they are sent: at most one
    message per partition is pending in Python, librdkafka's queue is capped, so RAM does not grow with
    ``events``. (Generating them all first cost ~4 KB per event — each ``orjson.dumps`` result keeps a
    fragmented heap chunk — ~39 GiB at 10M: the OOM of issue 18.) Returns the last offset per partition."""
    from confluent_kafka import Producer

    from streams.contracts import partition_for

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "queue.buffering.max.kbytes": 64 * 1024})
    last: dict[int, int] = {}
    errors: list[str] = []

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            errors.append(str(err))
            return
        last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())  # type: ignore[attr-defined]

    def send(p: int, batch: list[bytes]) -> None:
        value = b"[" + b",".join(batch) + b"]"
        while True:
            try:
                producer.produce(topic, value=value, partition=p, on_delivery=delivered)
                break
            except BufferError:  # the capped queue is full: wait for deliveries
                producer.poll(0.1)
        producer.poll(0)

    subject_partition = [partition_for(f"s{k}", partitions) for k in range(1000)]
    pending: dict[int, list[bytes]] = {}
    now = datetime.now(UTC).isoformat()
    for i in range(events):
        k = i % 1000
        p = subject_partition[k]
        batch = pending.setdefault(p, [])
        batch.append(orjson.dumps({"specversion": "1.0", "id": f"e{i}", "source": "bench", "type": "llm.tokens",
                                   "subject": f"s{k}", "project": "bench", "time": now,
                                   "data": {"tokens": i % 7 + 1}}))
        if len(batch) == pack:
            send(p, batch)
            pending[p] = []
    for p, batch in pending.items():
        if batch:
            send(p, batch)
    assert producer.flush(120) == 0 and not errors, errors[:3]
    return last


def replay_phase(database_url: str, engine: Engine, events: int, *, timeout_s: float = 600) -> None:
    from meterline import services
    from meterline.cli_replay import run_replay
    from meterline.topics import ensure_topics, topic_specs
    from streams import catalog

    partitions = 8
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as home:
        broker = services.start_embedded_broker(host="127.0.0.1", port=services.free_port(),
                                                log_path=Path(home) / "broker.log")
        try:
            ensure_topics(broker.bootstrap, topic_specs(prefix="bench.", usage_partitions=partitions,
                                                        charges_partitions=2, transactions_partitions=2))
            topic = "bench.usage.events.v1"
            with engine.begin() as conn:
                catalog.create_meter(conn, project_id="bench", slug="tokens", event_type="llm.tokens",
                                     aggregation="SUM", value_property="$.tokens")
                catalog.create_price(conn, project_id="bench", meter="tokens",
                                     model={"model": "per_unit", "unit_price_minor": "0.4"},
                                     effective_from=datetime(2020, 1, 1, tzinfo=UTC))
            produce_started = time.monotonic()
            with PeakRss() as produce_rss:
                last = produce_events(broker.bootstrap, topic, events=events, partitions=partitions)
            print(f"generate + produce {events:,} events in {time.monotonic() - produce_started:.1f} s: peak RSS "
                  f"{produce_rss.peak_mib:,.0f} MiB "
                  f"(streamed: one packed message per partition in RAM at a time)")
            with engine.begin() as conn:  # as if the ledger had applied everything
                for p, offset in last.items():
                    conn.execute(text("INSERT INTO applied_offsets (source_topic, partition, applied_through) "
                                      "VALUES (:t, :p, :o)"), {"t": topic, "p": p, "o": offset})
            started = time.monotonic()
            with PeakRss() as replay_rss:
                report = run_replay(database_url=database_url, bootstrap=broker.bootstrap, topic=topic,
                                    partitions=partitions, wanted=range(partitions), from_offset=None,
                                    to_offset=None, since=None, until=None, project=None, subjects=[], meters=[],
                                    apply=False, timeout_s=timeout_s)
            seconds = time.monotonic() - started
            print(f"replay: {events:,} events in {report['messages']:,} messages, 8 partitions, 1,000 subjects: "
                  f"{seconds:.2f} s end to end = {events / seconds:,.0f} events/s (metering + diff "
                  f"{report['replay_s']:.2f} s of it incl. the broker read); {len(report['differences']):,} keys "
                  f"differ (the ledger holds no counters here: every key is reported); peak RSS during the replay "
                  f"{replay_rss.peak_mib:,.0f} MiB (from {replay_rss.start_mib:,.0f} MiB at its start)")
            assert report["messages"] == sum(o + 1 for o in last.values()), "the replay read less than the log"
        finally:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--wallets", type=int, default=2_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--only", choices=("chain", "export", "replay"), action="append",
                        help="run only these phases (repeatable; export reads the chain phase's rows)")
    parser.add_argument("--replay-timeout", type=float, default=1_800, help="seconds the replay may read for")
    args = parser.parse_args()
    phases = set(args.only or ("chain", "export", "replay"))
    print(describe())
    with scratch_database() as url:
        from meterline.stack import migrate

        migrate(url)  # every component: the catalog tables are streams'; the replay reads them
        engine = make_engine(url, pool_size=2)
        try:
            if "chain" in phases:
                chain_phase(engine, args.transactions, args.wallets)
            if "export" in phases:
                export_phase(engine)
            if "replay" in phases:
                replay_phase(url, engine, args.events, timeout_s=args.replay_timeout)
        finally:
            engine.dispose()


if __name__ == "__main__":
    main()
