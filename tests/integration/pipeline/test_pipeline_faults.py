"""Fault injection (DESIGN §2.1/§2.2): ≥ 100,000 events in packed messages while streams workers and the
ledger consumer are SIGKILLed at random moments; afterwards every wallet balance and every counter is exact,
no transaction is duplicated, nothing is lost.

"Everything applied" is read from the ledger's applied marks against the offsets the producer's delivery
reports returned — never from end offsets (wrong on this broker)."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pipeline_harness import (
    EventProducer,
    Pipeline,
    Proc,
    make_event,
    price_floor,
    setup_catalog,
    wallet_of,
)

from streams.metering import period_bounds

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 110_000
SUBJECTS = 400
PACK = 100
ROUNDS = 6


def _expected(events: list[dict[str, object]]) -> tuple[dict[str, int], dict[str, Decimal]]:
    """Balances and units computed from what was sent: each distinct id once, priced per (wallet, period)."""
    seen: set[str] = set()
    units: dict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    for ev in events:
        if ev["id"] in seen:
            continue
        seen.add(str(ev["id"]))
        at = datetime.fromisoformat(str(ev["time"]))
        units[(wallet_of(str(ev["subject"])), period_bounds(at, "month")[0])] += Decimal(ev["data"]["tokens"])  # type: ignore[index]
    balances: dict[str, int] = defaultdict(int)
    per_wallet: dict[str, Decimal] = defaultdict(Decimal)
    for (wallet, _), u in units.items():
        balances[wallet] -= price_floor(u, Decimal("0.4"))
        per_wallet[wallet] += u
    return dict(balances), dict(per_wallet)


def test_exact_totals_after_random_sigkills_of_workers_and_ledger(pipeline: Pipeline) -> None:
    setup_catalog(pipeline.database_url)
    rng = random.Random(20261122)
    now = datetime.now(UTC)
    events: list[dict[str, object]] = []
    for i in range(EVENTS):
        # one hot subject takes a fifth of the traffic; times out of order within the last 10 minutes
        subject = "hot" if rng.random() < 0.2 else f"user-{rng.randrange(SUBJECTS)}"
        events.append(make_event(i, subject, rng.randint(1, 50), time=now - timedelta(seconds=rng.uniform(0, 600))))
    # ~5% resent later (a producer retrying after a timeout): same id, same content
    resends = [events[rng.randrange(EVENTS)] for _ in range(EVENTS // 20)]

    workers: list[Proc] = [pipeline.start("streams", STREAMS_WORKER_INDEX="0"),
                           pipeline.start("streams", STREAMS_WORKER_INDEX="1")]
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    stop_producing = threading.Event()

    def produce() -> None:
        # ~35 s of traffic in slices, resends mixed in after their originals
        chunk = 2_500
        for start in range(0, EVENTS, chunk):
            if stop_producing.is_set():
                return
            batch = events[start:start + chunk]
            batch += [ev for ev in resends[start // 50:(start + chunk) // 50] if int(str(ev["id"])[3:]) < start]
            producer.send_packed(batch, pack=PACK)
            producer.producer.poll(0)
            time.sleep(0.8)
        producer.flush()

    thread = threading.Thread(target=produce, name="producer")
    thread.start()
    kills = {"streams": 0, "ledger": 0}
    try:
        time.sleep(8)
        for round_no in range(ROUNDS):
            time.sleep(rng.uniform(2.0, 6.0))
            target = ["streams", "ledger", "both"][round_no % 3] if round_no < 3 else rng.choice(
                ["streams", "ledger", "both"])
            if target in ("streams", "both"):
                victim_index = rng.randrange(len(workers))
                workers[victim_index].kill()
                kills["streams"] += 1
                time.sleep(rng.uniform(0.0, 3.0))
                workers[victim_index] = pipeline.start("streams", STREAMS_WORKER_INDEX=str(victim_index))
            if target in ("ledger", "both"):
                ledger.kill()
                kills["ledger"] += 1
                time.sleep(rng.uniform(0.0, 3.0))
                ledger = pipeline.start("ledger")
    finally:
        thread.join(timeout=120)
        stop_producing.set()
    assert not thread.is_alive()
    assert kills["streams"] >= 3 and kills["ledger"] >= 3
    sent = producer.sent
    assert sent.events >= EVENTS

    pipeline.wait_applied(sent.last_offset, timeout_s=180, watch=[*workers, ledger])

    balances, units = _expected(events)
    assert pipeline.wallet_balances() == balances
    charged_units: dict[str, Decimal] = defaultdict(Decimal)
    for (wallet, _), (u, _) in pipeline.charges().items():
        charged_units[wallet] += u
    assert dict(charged_units) == units
    # the per-partition counters the workers will seed from add up to the same units
    counters = pipeline.sql("SELECT wallet_id, sum(units) FROM usage_counters WHERE project_id = %s GROUP BY 1",
                            "prj_pipeline")
    assert {w: u for w, u in counters} == units
    pipeline.assert_ledger_consistent()
