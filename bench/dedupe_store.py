"""Dedupe store micro-benchmark: ns per remember / lookup and bytes per key, RAM-only ``DedupeMemory`` against the
disk-backed ``DedupeStore``, at the production ratios scaled down (defaults: 2 M keys over a 24 h horizon, RAM tier
1/432 of them and a filter of ~1.24 B/key, as 500k RAM keys and 256 MiB are for 216 M keys per partition — 20,000
events/s over 8 partitions for 24 h).

    python -m bench.dedupe_store                    # ~1 min on 2 shared cores
    python -m bench.dedupe_store --keys 4000000 --ram-keys 10000 --filter-mb 2
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from streams.dedupe_memory import DedupeMemory
from streams.dedupe_store import DedupeStore, ram_bytes_bound

DAY_S = 86_400


def fill(store: DedupeStore | DedupeMemory, keys: list[int], t0: float, step_s: float) -> float:
    started = time.perf_counter()
    for i, key in enumerate(keys):
        at = t0 + i * step_s
        store.remember(key, at)
        if i % 10_000 == 0:
            store.forget_before(at - DAY_S)
    return (time.perf_counter() - started) / len(keys) * 1e9


def lookups(store: DedupeStore | DedupeMemory, keys: list[int]) -> tuple[float, int]:
    started = time.perf_counter()
    found = sum(1 for key in keys if key in store)
    return (time.perf_counter() - started) / len(keys) * 1e9, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2_000_000, help="keys over one 24 h horizon")
    parser.add_argument("--ram-keys", type=int, default=0, help="RAM tier (default keys / 432)")
    parser.add_argument("--filter-mb", type=float, default=0.0, help="filter (default ~1.24 B per key)")
    parser.add_argument("--lookups", type=int, default=200_000)
    args = parser.parse_args()
    ram_keys = args.ram_keys or max(1_000, args.keys // 432)
    filter_bytes = int(args.filter_mb * 2**20) if args.filter_mb else max(1024, args.keys * 124 // 100)
    print(describe())
    print("load average at start: {:.2f} {:.2f} {:.2f} (shared machine)".format(*os.getloadavg()))
    print(f"{args.keys:,} keys over 24 h of stream time; RAM tier {ram_keys:,} keys; filter {filter_bytes:,} B "
          f"({8 * filter_bytes / args.keys:.1f} bits per key of the horizon)")
    rng = random.Random(17)
    keys = [rng.getrandbits(64) - 2**63 for _ in range(args.keys)]
    new = [rng.getrandbits(64) - 2**63 for _ in range(args.lookups)]
    old = rng.sample(keys[: args.keys // 2], min(args.lookups // 4, args.keys // 2))  # the older half: on disk
    step_s = (DAY_S - 120) / args.keys
    t0 = 1.7e9

    with tempfile.TemporaryDirectory(prefix="bench-dedupe-") as tmp:
        store = DedupeStore(slot_s=60, horizon_s=DAY_S, ram_keys=ram_keys, filter_bytes=filter_bytes, directory=tmp)
        remember_ns = fill(store, keys, t0, step_s)
        new_ns, false_dups = lookups(store, new)
        maybe_before = store.stats["filter_maybe"]
        reads_before = store.stats["run_reads"]
        new_ns, false_dups = lookups(store, new)
        maybe_rate = (store.stats["filter_maybe"] - maybe_before) / len(new)
        reads_per = (store.stats["run_reads"] - reads_before) / len(new)
        old_ns, old_found = lookups(store, old)
        recent_ns, _ = lookups(store, [k for k in keys[-ram_keys:] if k in store._ram_keys])
        print(f"DedupeStore: remember {remember_ns:,.0f} ns/key (spills {store.stats['spills']}, merges "
              f"{store.stats['merges']}); runs {store.runs}; disk {store.disk_bytes / len(keys):.1f} B/key")
        print(f"  lookup of a NEW key {new_ns:,.0f} ns (filter 'maybe' {100 * maybe_rate:.1f}%, "
              f"{reads_per:.2f} run reads per lookup; false duplicates {false_dups})")
        print(f"  lookup of an OLD key on disk {old_ns:,.0f} ns (found {old_found:,}/{len(old):,}); "
              f"of a key in the RAM tier {recent_ns:,.0f} ns")
        store.close()
        tracemalloc.start()
        store = DedupeStore(slot_s=60, horizon_s=DAY_S, ram_keys=ram_keys, filter_bytes=filter_bytes, directory=tmp)
        fill(store, keys, t0, step_s)
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        bound = ram_bytes_bound(ram_keys=ram_keys, filter_bytes=filter_bytes, merge_keys_max=store.merge_keys_max,
                                keys_on_disk=len(keys))
        print(f"  RAM: {current / 2**20:,.1f} MiB held ({current / len(keys):.2f} B per key of the horizon), "
              f"peak {peak / 2**20:,.1f} MiB; stated bound {bound / 2**20:,.1f} MiB")
        store.close()

    memory = DedupeMemory(slot_s=60, keys_max=2**62)
    remember_ns = fill(memory, keys, t0, step_s)
    new_ns, _ = lookups(memory, new)
    old_ns, _ = lookups(memory, old)
    tracemalloc.start()
    memory = DedupeMemory(slot_s=60, keys_max=2**62)
    fill(memory, keys, t0, step_s)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"DedupeMemory (all in RAM, before): remember {remember_ns:,.0f} ns/key, lookup new {new_ns:,.0f} ns, "
          f"old {old_ns:,.0f} ns; RAM {current / 2**20:,.1f} MiB ({current / len(keys):.1f} B per key)")
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
