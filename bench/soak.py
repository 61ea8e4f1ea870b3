"""Soak: the pipeline (2 streams workers, 1 ledger consumer, embedded broker + PostgreSQL — bench/pipeline.py's
stack and harness) at a fixed offered rate for many minutes, with old duplicates resent every minute.

    python -m bench.soak --minutes 30 --rate 20000        # issue 17's bar: streams RSS flat after warm-up
    python -m bench.soak --minutes 5 --rate 20000         # a short run

Per minute of send time it prints: offered and end-to-end events/s of that minute's events, event → balance p50 /
p99 (when the ledger's applied mark passed the message, polled every 20 ms), and the RSS of every process at the
minute's end. Before the load, ``--old-events`` events are sent once; every minute ``--resends`` of them are sent
again with the same ids — duplicates that by then live in the dedupe store's disk runs (streams/dedupe_store.py),
never charged. At the end: exact money (every wallet equals the price of the distinct events sent to it, no
duplicate ledger keys) and the streams workers' RSS spread after ``--warmup-minutes``. Exit 1 when money is not
exact. Options pass dedupe settings through (``--dedupe-ram-keys``, ``--dedupe-filter-mb``, ``--horizon-s``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import psutil

from bench.machine import describe
from bench.pipeline import (
    PROJECT,
    USAGE_PARTITIONS,
    AppliedWatcher,
    LoadProducer,
    Sent,
    check_totals,
    engines,
    keep_logs,
    postgres_pids,
    prepare_stack,
    start,
    stop,
    warm_up,
)


def child_pids(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return []


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def send_old_events(producer: LoadProducer, sent: Sent, count: int, pack: int,
                    rng: random.Random) -> dict[int, list[dict[str, Any]]]:
    """``count`` events sent once now (their units are expected once); returned by partition for resending."""
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    now_iso = datetime.now(UTC).isoformat()
    by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for i in range(count):
        p = i % USAGE_PARTITIONS
        subjects = producer.subjects[p]
        subject = subjects[rng.randrange(len(subjects))]
        tokens = rng.randint(1, 100)
        by_partition[p].append({"specversion": "1.0", "id": f"old-{i}", "source": "bench", "type": "llm.tokens",
                                "subject": subject, "project": PROJECT, "time": now_iso, "data": {"tokens": tokens}})
        sent.units[(subject, month)] += tokens
    for p, events in by_partition.items():
        for at in range(0, len(events), pack):
            chunk = events[at:at + pack]
            producer._send(sent, p, orjson.dumps(chunk), len(chunk))
    assert producer.producer.flush(60) == 0
    return by_partition


def resend(producer: LoadProducer, sent: Sent, old: dict[int, list[dict[str, Any]]], count: int, pack: int,
           rng: random.Random) -> None:
    """``count`` old events again, same ids (duplicates: no units expected), with a fresh producer timestamp."""
    for p, events in old.items():
        picked = rng.sample(events, min(len(events), count // len(old)))
        for at in range(0, len(picked), pack):
            chunk = picked[at:at + pack]
            producer._send(sent, p, orjson.dumps(chunk), len(chunk))
    assert producer.producer.flush(60) == 0


def objects_per_partition(storage: Path) -> dict[str, int]:
    """The most batch objects a partition of each topic holds in the disk store: what the broker lists on every
    fetch (docs/architecture.md "Durable topics"), so what must not grow without bound."""
    most: dict[str, int] = {}
    for records in storage.glob("tansu/clusters/*/topics/*/partitions/*/records"):
        topic = ".".join(records.parent.parent.parent.name.split(".")[-3:-1])  # <prefix>.usage.events.v1
        count = sum(1 for p in records.iterdir() if p.name.endswith(".batch") and not p.name.startswith("."))
        most[topic] = max(most.get(topic, 0), count)
    return dict(sorted(most.items()))


def minute_line(minute: int, sent: Sent, watcher: AppliedWatcher, rss: dict[str, float],
                objects: dict[str, int]) -> str:
    wall = max(watcher.last_applied_at - sent.first_sent, 1e-3)
    applied = sum(n for _, n in watcher.latencies)
    processes = "  ".join(f"{name} {mib:,.0f}" for name, mib in rss.items())
    return (f"  min {minute + 1:>3}: offered {sent.events / 60:>7,.0f}/s  end to end {applied / wall:>7,.0f}/s  "
            f"p50 {1000 * watcher.percentile(0.50):>6,.0f} ms  p99 {1000 * watcher.percentile(0.99):>6,.0f} ms  "
            f"rss MiB: {processes}"
            + (f"  objects/partition: {' '.join(f'{t} {n:,}' for t, n in objects.items())}" if objects else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=5)
    parser.add_argument("--rate", type=float, default=20_000.0, help="offered events/s (open loop)")
    parser.add_argument("--pack", type=int, default=200, help="events per packed message")
    parser.add_argument("--subjects", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=2, help="streams worker processes")
    parser.add_argument("--old-events", type=int, default=40_000, help="sent once before the load")
    parser.add_argument("--resends", type=int, default=4_000, help="old events resent every minute (duplicates)")
    parser.add_argument("--warmup-minutes", type=int, default=5, help="RSS spread is measured after these")
    parser.add_argument("--dedupe-ram-keys", type=int, default=None, help="STREAMS_DEDUPE_MEMORY_MAX")
    parser.add_argument("--dedupe-filter-mb", type=int, default=None, help="STREAMS_DEDUPE_FILTER_MB")
    parser.add_argument("--horizon-s", type=int, default=None, help="STREAMS_DEDUPE_HORIZON_S")
    parser.add_argument("--broker-storage", choices=("disk", "memory"), default="disk")
    parser.add_argument("--logs", type=Path, default=None, help="copy the processes' logs here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    print(describe())
    print("load average at start: {:.2f} {:.2f} {:.2f} (the machine is shared; other load skews every figure)"
          .format(*os.getloadavg()))
    dedupe_env = {name: str(value) for name, value in (("STREAMS_DEDUPE_MEMORY_MAX", args.dedupe_ram_keys),
                                                        ("STREAMS_DEDUPE_FILTER_MB", args.dedupe_filter_mb),
                                                        ("STREAMS_DEDUPE_HORIZON_S", args.horizon_s))
                  if value is not None}
    print(f"soak: {args.minutes} min at {args.rate:,.0f} events/s offered, {USAGE_PARTITIONS} partitions, "
          f"{args.workers} streams workers, 1 ledger consumer, pack {args.pack}, {args.subjects} subjects; "
          f"{args.old_events:,} old events, {args.resends:,} of them resent per minute; dedupe settings: "
          f"{dedupe_env or 'defaults'}")
    rng = random.Random(17)
    ok = False
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        home = Path(tmp)
        with engines(home, broker_storage=args.broker_storage) as eng:
            env, topic = prepare_stack(eng)
            (home / "dedupe").mkdir()
            # probes on any free port: another stack on this shared machine may hold the default ones
            env = {**env, **dedupe_env, "STREAMS_DEDUPE_DIR": str(home / "dedupe"), "STREAMS_METRICS_PORT": "0",
                   "LEDGER_METRICS_PORT": "0"}
            workers = [start([sys.executable, "-m", "meterline", "run", "streams"],
                             {**env, "STREAMS_WORKER_INDEX": str(i)}, home / f"streams-{i}.log")
                       for i in range(args.workers)]
            ledger = start([sys.executable, "-m", "meterline", "run", "ledger"], env, home / "ledger.log")
            procs = [*workers, ledger]
            try:
                producer = LoadProducer(eng.bootstrap, topic, subjects=args.subjects, pack=args.pack, seed=1)
                warm_up(producer, eng.database_url, topic, timeout_s=90)
                groups = {f"streams-{i}": [w.pid] for i, w in enumerate(workers)}
                groups["ledger"] = [ledger.pid]
                if eng.broker_pid:
                    groups["broker"] = [eng.broker_pid]
                if eng.store_pid:
                    groups["broker store"] = [eng.store_pid]
                groups["postgres"] = postgres_pids(eng.pg_dir)
                groups["producer"] = [os.getpid()]
                old_sent = Sent()
                old = send_old_events(producer, old_sent, args.old_events, args.pack, rng)
                sents: list[Sent] = []
                pending: tuple[int, Sent, AppliedWatcher, dict[str, float], dict[str, int]] | None = None
                streams_rss: list[tuple[int, float]] = []
                print("per minute of send time (latency = event -> balance; rss = at the minute's end):")
                for minute in range(args.minutes):
                    sent = Sent()
                    watcher = AppliedWatcher(eng.database_url, topic, sent).start()
                    producer.run(sent, seconds=60.0, rate=args.rate, tag=f"m{minute}")
                    resend(producer, sent, old, args.resends, args.pack, rng)
                    groups["postgres"] = postgres_pids(eng.pg_dir)
                    if eng.store_pid:  # with its merge worker
                        groups["broker store"] = [eng.store_pid, *child_pids(eng.store_pid)]
                    rss = {name: rss_mib(pids) for name, pids in groups.items()}
                    objects = objects_per_partition(home / "broker")
                    streams_rss.append((minute, sum(v for k, v in rss.items() if k.startswith("streams"))))
                    sents.append(sent)
                    if pending is not None:  # the previous minute's events had a minute to be applied
                        m, s, w, r, o = pending
                        w.wait_all(timeout_s=120)
                        w.stop()
                        print(minute_line(m, s, w, r, o), flush=True)
                    pending = (minute, sent, watcher, rss, objects)
                if pending is not None:
                    m, s, w, r, o = pending
                    complete = w.wait_all(timeout_s=300)
                    w.stop()
                    print(minute_line(m, s, w, r, o) + ("" if complete else "  (NOT all applied)"), flush=True)
                ok, detail = check_totals(eng.database_url, [old_sent, *sents])
                print(f"exact money: {'OK' if ok else 'WRONG'} ({detail}; "
                      f"{args.old_events:,} old events charged once, {args.resends * args.minutes:,} resends not)")
                after = [mib for m, mib in streams_rss if m >= args.warmup_minutes]
                if after:
                    print(f"streams workers' RSS (sum) after minute {args.warmup_minutes}: min {min(after):,.0f} MiB, "
                          f"max {max(after):,.0f} MiB, growth {100 * (max(after) / min(after) - 1):.1f}%")
                else:
                    print(f"streams workers' RSS (sum) per minute: {[round(v) for _, v in streams_rss]} MiB "
                          f"(shorter than the {args.warmup_minutes}-minute warm-up)")
            finally:
                stop(procs)
                keep_logs(home, args.logs)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
