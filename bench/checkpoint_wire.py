"""What one counter of a charge checkpoint costs on the wire: written by a streams worker, read by the ledger.

    .venv/bin/python -m bench.checkpoint_wire [--counters 4000] [--price graduated|per_unit] [--repeats 15]

A streams ``PartitionAggregator`` meters one event for each of ``--counters`` subjects (auto-provisioned wallets, one
meter, one price version) and cuts a checkpoint; the bench then times ``Checkpoint.to_json`` (the worker's side) and
the ledger consumer's decode (``ledger.consumer._decode_bytes``, under the consumer's collector setting) and prints
the best of ``--repeats`` in µs per counter. It checks that every decoded counter carries the metered key, units,
events and price: EXACT or the first mismatch. No services: pure CPU, in this process."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from bench.machine import describe
from ledger.consumer import _decode_bytes
from ledger.contracts import PriceModel, PriceTier
from ledger.runtime import cyclic_gc_paused
from streams.catalog_model import CatalogSnapshot, Meter, PriceVersion, ProjectPolicy, parse_path
from streams.metering import PartitionAggregator

PROJECT = "bench-project"
ARRIVAL = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
PRICES = {
    "per_unit": PriceModel(model="per_unit", unit_price_minor=Decimal("0.4")),
    "graduated": PriceModel(model="graduated", tiers=(PriceTier(up_to=Decimal(1_000), unit_price_minor=Decimal(2)),
                                                      PriceTier(unit_price_minor=Decimal("0.5")))),
}


def _catalog(price: PriceModel) -> CatalogSnapshot:
    meter = Meter(id="tokens", project_id=PROJECT, slug="tokens", event_type="llm.tokens", aggregation="SUM",
                  value_property="$.tokens", filters=(), value_steps=parse_path("$.tokens"))
    version = PriceVersion(id="tokens-v1", price_id="price-tokens", meter_id="tokens", project_id=PROJECT, version=1,
                           model=price, period="month", effective_from=datetime(2026, 1, 1, tzinfo=UTC),
                           model_json=price.model_dump(mode="json"))
    return CatalogSnapshot.build(meters=[meter], price_versions=[version], subject_keys={}, policies={},
                                 default_policy=ProjectPolicy("auto_provision", 3_600))


def _best_us(run: Callable[[], object], repeats: int, per: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1e6 / per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counters", type=int, default=4_000)
    parser.add_argument("--price", choices=sorted(PRICES), default="graduated")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(describe())
    aggregator = PartitionAggregator(source_topic="usage.events.v1", partition=0, partitions=1)
    events = [{"specversion": "1.0", "id": f"e{i}", "source": "bench", "type": "llm.tokens", "subject": f"s{i}",
               "project": PROJECT, "time": f"2026-12-07T11:{i % 60:02d}:{i % 59:02d}.{i % 1_000:03d}Z",
               "data": {"tokens": 1 + i % 97}} for i in range(args.counters)]
    aggregator.process(offset=0, value=orjson.dumps(events), arrival=ARRIVAL, catalog=_catalog(PRICES[args.price]))
    checkpoint = aggregator.checkpoint()
    assert checkpoint is not None and len(checkpoint.counters) == args.counters, "one counter per subject"
    raw = checkpoint.to_json(emitted_at=ARRIVAL, owner_epoch=1)
    with cyclic_gc_paused():
        write_us = _best_us(lambda: checkpoint.to_json(emitted_at=ARRIVAL, owner_epoch=1), args.repeats,
                            args.counters)
        read_us = _best_us(lambda: _decode_bytes(raw), args.repeats, args.counters)
    print(f"checkpoint: {args.counters:,} counters, {args.price} price, {len(raw):,} bytes "
          f"({len(raw) / args.counters:.0f} per counter)")
    print(f"write (streams, Checkpoint.to_json): {write_us:.2f} µs per counter")
    print(f"read (ledger, _decode_bytes):        {read_us:.2f} µs per counter")
    decoded = _decode_bytes(raw)
    assert decoded is not None, "the ledger refused the checkpoint"
    for value, ((wallet_id, project_id, meter_id, period_start, version), counter) in zip(
            decoded.counters, checkpoint.counters, strict=True):
        assert counter.price is not None
        wanted = (wallet_id, project_id, meter_id, period_start, version, counter.units, counter.events,
                  counter.price.model, counter.latest_at)
        got = (value.key.wallet_id, value.key.project_id, value.key.meter_id, value.key.period_start,
               value.key.price_version_id, value.units, value.events, value.price, value.latest_at)
        if got != wanted:
            print(f"MISMATCH: {got} != {wanted}")
            sys.exit(1)
    print(f"round trip: EXACT ({len(decoded.counters):,} counters)")


if __name__ == "__main__":
    main()
