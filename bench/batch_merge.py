"""What the disk store's compaction costs per record, one command:

    .venv/bin/python -m bench.batch_merge                 # one-event messages, lz4, as a plain client sends them
    .venv/bin/python -m bench.batch_merge --shape checkpoints --batches 16 --records 26   # the second tier's work

Builds ``--batches`` record batches of ``--records`` usage events each (JSON like the ingest API's, keyed by
subject, lz4 like every Meterline producer) in Kafka's v2 format as the broker stores them, then merges them the
way ``DiskStore.compact`` does (meterline/batch_merge.py: decode, rebuild as one batch, read back and compare)
``--rounds`` times. Prints µs per record for the merge and its parts, bytes before and after, and the machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from bench.machine import describe
from meterline.batch_merge import merge_batches, records_of

LZ4 = 3


def usage_batch(records: int, first: int, *, codec: int) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=0, producer_id=5,
                                        producer_epoch=0, base_sequence=first, batch_size=2**31 - 1)
    for delta in range(records):
        n = first + delta
        subject = f"customer-{n % 1000}"
        value = orjson.dumps({"id": f"evt-{n:012d}", "subject": subject, "meter": "api_calls", "quantity": 1,
                              "timestamp": "2026-12-05T08:00:00.000Z", "properties": {"route": "/v1/chat"}})
        builder.append(delta, timestamp=1_796_000_000_000 + n, key=subject.encode(), value=value, headers=[])
    return bytes(builder.build())


def checkpoint_batch(records: int, first: int, *, codec: int) -> bytes:
    """A batch like the charges topic's: few records of ~70 KB of JSON (a checkpoint's keys and counters), which
    the first tier leaves alone (~0.5 MiB lz4) and the second merges."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=0, producer_id=5,
                                        producer_epoch=0, base_sequence=first, batch_size=2**31 - 1)
    for delta in range(records):
        n = first + delta
        rng = random.Random(n)
        keys = [{"wallet": str(uuid.UUID(int=rng.getrandbits(128))), "meter": "api_calls", "period": "2026-12",
                 "price_version": 3, "value": rng.randrange(10**9), "events": rng.randrange(1_000)}
                for _ in range(500)]
        value = orjson.dumps({"partition": n % 8, "offset": n * 5_000, "keys": keys})
        builder.append(delta, timestamp=1_796_000_000_000 + n, key=b"%d" % (n % 8), value=value, headers=[])
    return bytes(builder.build())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=500, help="source batches per merge")
    parser.add_argument("--records", type=int, default=4, help="records per source batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--codec", type=int, default=LZ4, help="0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd")
    parser.add_argument("--shape", choices=("usage", "checkpoints"), default="usage")
    args = parser.parse_args()
    print(describe())
    make = usage_batch if args.shape == "usage" else checkpoint_batch
    sources = [(i * args.records, make(args.records, i * args.records, codec=args.codec))
               for i in range(args.batches)]
    count = args.batches * args.records
    merge_s, decode_s, check_s = [], [], []
    merged = b""
    for _ in range(args.rounds):
        started = time.perf_counter()
        merged = merge_batches(sources)
        merge_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for base, data in sources:
            records_of(data, base)
        decode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        records_of(merged, 0)
        check_s.append(time.perf_counter() - started)
    per = 1e6 / count
    source_bytes = sum(len(d) for _, d in sources)
    print(f"{args.batches} batches of {args.records} records (codec {args.codec}): {source_bytes:,} B -> "
          f"{len(merged):,} B merged ({len(merged) / source_bytes:.0%})")
    print(f"merge: {statistics.median(merge_s) * per:.2f} µs per record (median of {args.rounds}); of which decoding "
          f"the sources {statistics.median(decode_s) * per:.2f}, reading the result back "
          f"{statistics.median(check_s) * per:.2f}, building the rest")
    print(f"one core merges ~{1 / statistics.median(merge_s) * count:,.0f} records/s, "
          f"{source_bytes / statistics.median(merge_s) / 2**20:,.1f} MiB/s of stored batches "
          f"({statistics.median(merge_s) * 1000:,.0f} ms per merge)")


if __name__ == "__main__":
    main()
