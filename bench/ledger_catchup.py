"""The ledger consumer catching up on a backlog of large checkpoints: how fast, in how much memory, exact.

    .venv/bin/python -m bench.ledger_catchup [--checkpoints 240] [--counters 4000] [--wallets 100000]
                                             [--batch-bytes-max BYTES] [--dedupe-keys]

What a ledger that was down meets when it comes back under many wallets: ``--checkpoints`` ChargeCheckpoints of
``--counters`` counters each wait in ``ledger.charges.v1`` (8 source partitions, each with its own slice of
``--wallets`` wallets, values cumulative per key as streams emits them) before ``meterline run ledger`` starts.
Prints the time until every checkpoint is applied, the postings per second, the consumer's peak RSS and its
largest fetched batch, and checks every wallet's balance against the units its keys reached (price 1 minor per
unit): EXACT or the mismatches. ``--batch-bytes-max`` sets ``LEDGER_CONSUMER_BATCH_BYTES_MAX`` (default: the
setting's default). ``--dedupe-keys``: each checkpoint also carries one dedupe key per event it adds, as streams
emits them (~12,000 for 4,000 counters: more bytes to decode, and ``MERGE_DEDUPE_KEYS_MAX`` then bounds how many
checkpoints merge). Embedded broker and PostgreSQL, as bench.pipeline starts them (``DATABASE_URL`` /
``KAFKA_BOOTSTRAP_SERVERS`` use running ones)."""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
from confluent_kafka import Producer

from bench.machine import describe
from bench.pipeline import PROJECT, Meter, engines, prepare_stack, start, stop
from ledger.contracts import TOPIC_LEDGER_CHARGES, ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.db import libpq_url

SOURCE_PARTITIONS = 8
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal(1))
PERIOD = datetime(2026, 12, 1, tzinfo=UTC)


def backlog(source_topic: str, *, checkpoints: int, counters: int, wallets: int, dedupe_keys: bool = False,
            seed: int = 7) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """The checkpoints (charges key, value) in emission order, and what every wallet must be charged. A unit is an
    event; with ``dedupe_keys`` a checkpoint lists a (random, 64-bit) dedupe key per event it adds."""
    rng = random.Random(seed)
    units: dict[str, int] = defaultdict(int)  # cumulative per wallet (one meter, one period, one price version)
    slices = [[f"catchup-{w}" for w in range(p, wallets, SOURCE_PARTITIONS)] for p in range(SOURCE_PARTITIONS)]
    as_of = [0] * SOURCE_PARTITIONS
    out = []
    for n in range(checkpoints):
        p = n % SOURCE_PARTITIONS
        touched = rng.sample(slices[p], min(counters, len(slices[p])))
        added = 0
        for wallet in touched:
            events = rng.randint(1, 5)
            units[wallet] += events
            added += events
        keys = [rng.getrandbits(64) - 2**63 for _ in range(added)] if dedupe_keys else []
        as_of[p] += 1_000
        checkpoint = ChargeCheckpoint(
            source_topic=source_topic, partition=p, as_of_offset=as_of[p], emitted_at=datetime.now(UTC),
            counters=[CounterValue(key=CounterKey(wallet_id=w, project_id=PROJECT, meter_id="catchup",
                                                  period_start=PERIOD, price_version_id="catchup-v1"),
                                   units=Decimal(units[w]), price=PRICE, events=units[w]) for w in touched],
            dedupe_keys=keys)
        out.append((f"{source_topic}:{p}", checkpoint.model_dump_json().encode()))
    return out, dict(units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=240)
    parser.add_argument("--counters", type=int, default=4_000, help="counters per checkpoint")
    parser.add_argument("--wallets", type=int, default=100_000)
    parser.add_argument("--batch-bytes-max", type=int, default=None, help="LEDGER_CONSUMER_BATCH_BYTES_MAX")
    parser.add_argument("--dedupe-keys", action="store_true",
                        help="one dedupe key per event in each checkpoint, as streams emits them")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    print(describe())
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="bench-catchup-") as tmp, engines(Path(tmp)) as eng:
        home = Path(tmp)
        env, usage_topic = prepare_stack(eng)
        if args.batch_bytes_max:
            env["LEDGER_CONSUMER_BATCH_BYTES_MAX"] = str(args.batch_bytes_max)
        messages, expected = backlog(usage_topic, checkpoints=args.checkpoints, counters=args.counters,
                                     wallets=args.wallets, dedupe_keys=args.dedupe_keys)
        charges_topic = env["METERLINE_TOPIC_PREFIX"] + TOPIC_LEDGER_CHARGES
        producer = Producer({"bootstrap.servers": eng.bootstrap, "linger.ms": 20, "message.max.bytes": 64 << 20,
                             "queue.buffering.max.kbytes": 2 << 20})
        for key, value in messages:
            producer.produce(charges_topic, key=key.encode(), value=value)
            producer.poll(0)
        assert producer.flush(120) == 0, "the backlog was not produced"
        wire = sum(len(v) for _, v in messages)
        print(f"backlog: {len(messages):,} checkpoints of {args.counters:,} counters over {args.wallets:,} wallets"
              f"{' with a dedupe key per event' if args.dedupe_keys else ''}, "
              f"{wire / 1e6:,.1f} MB on the wire (largest {max(len(v) for _, v in messages) / 1e6:.2f} MB)")
        last = {p: 1_000 * len(range(p, args.checkpoints, SOURCE_PARTITIONS)) for p in range(SOURCE_PARTITIONS)}
        started = time.monotonic()
        ledger = start([sys.executable, "-m", "meterline", "run", "ledger"], env, home / "ledger.log")
        done = False
        with Meter({"ledger": [ledger.pid]}) as meter:
            with psycopg.connect(libpq_url(eng.database_url), autocommit=True) as conn:
                while time.monotonic() - started < args.timeout_s and ledger.poll() is None:
                    rows = conn.execute("SELECT partition, applied_through FROM applied_offsets WHERE source_topic = %s",
                                        (usage_topic,)).fetchall()
                    if {p: a for p, a in rows} == last:
                        done = True
                        break
                    time.sleep(0.2)
            wall = time.monotonic() - started
        stop([ledger])
        print(f"applied: {done} in {wall:.1f} s (from the consumer's start, incl. its ~2 s start-up): "
              f"{len(messages) / wall:,.1f} checkpoints/s, {len(messages) * args.counters / wall:,.0f} counters/s")
        print("\n".join(meter.report(wall)))
        stats = [line for line in (home / "ledger.log").read_text(errors="replace").splitlines()
                 if "ledger_consumer_stopping" in line]
        print("consumer stats at stop:", stats[-1][:400] if stats else "(none)")
        with psycopg.connect(libpq_url(eng.database_url)) as conn:
            balances: dict[str, int] = dict(conn.execute("SELECT id, balance_minor FROM wallets WHERE id LIKE 'catchup-%'").fetchall())
        wrong = {w: (balances.get(w), -u) for w, u in expected.items() if balances.get(w) != -u}
        print(f"money: {'EXACT' if done and not wrong else 'WRONG'} ({len(expected):,} wallets charged, "
              f"{len(wrong):,} wrong{': ' + str(list(wrong.items())[:5]) if wrong else ''})")


if __name__ == "__main__":
    main()
