"""Fencing with real faust workers (DESIGN §2 invariant 11; tracker issue 13): a second worker joins the group,
the partitions really move, and the first owner — frozen with SIGSTOP while it holds metered events it has not
emitted yet — wakes up after the handover and emits them under its old owner epoch. The ledger must refuse
those checkpoints (``checkpoint_fenced``), the new owner charges the same offsets, and every wallet is exact.

The first owner reaches PostgreSQL through a gate (``pg_gate``). Closing the gate makes its next batch block in
the catalog probe that opens every batch, with the batch taken from Kafka but not yet metered or emitted; it is
then frozen, the group hands its partitions over, and it wakes with the gate open and emits. Freezing it at a
random moment instead (the first version of this test) was a race with librdkafka: when the eviction was noticed
inside the consume call, librdkafka dropped the lost partitions' messages from the batch, nothing old was ever
emitted, and CI failed for want of a fenced checkpoint although the money was exact."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal

import pytest
from pg_gate import PostgresGate
from pipeline_harness import EventProducer, Pipeline, Proc, make_event, price_floor, setup_catalog, wallet_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _epochs(pipeline: Pipeline) -> dict[int, int]:
    rows = pipeline.sql("SELECT partition, owner_epoch FROM applied_offsets WHERE source_topic = %s",
                        pipeline.usage_topic)
    return {int(p): int(e) for p, e in rows}


def _fenced(ledger: Proc) -> int:
    return ledger.log_path.read_text(errors="replace").count("checkpoint_fenced")


def _wait(predicate, timeout_s: float, what: str, watch: list[Proc]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in watch:
            assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def gate(pipeline: Pipeline) -> Iterator[PostgresGate]:
    g = PostgresGate(pipeline.database_url)
    try:
        yield g
    finally:
        g.shutdown()


def test_a_frozen_owner_is_fenced_after_a_real_rebalance_and_money_is_exact(pipeline: Pipeline,
                                                                           gate: PostgresGate) -> None:
    setup_catalog(pipeline.database_url)
    rng = random.Random(11)
    flush_s = 3.0
    old = pipeline.start("streams", STREAMS_WORKER_INDEX="0", STREAMS_FLUSH_MS_MAX=str(int(flush_s * 1000)),
                         DATABASE_URL=gate.url)
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    sent: list[dict[str, object]] = []
    stop = threading.Event()

    def produce() -> None:  # steady load: 20 messages of 10 events a second, over 40 subjects
        i = 0
        while not stop.is_set():
            batch = [make_event(i + k, f"user-{rng.randrange(40)}", rng.randint(1, 50)) for k in range(10)]
            i += 10
            producer.send_packed(batch, pack=10)
            sent.extend(batch)
            time.sleep(0.05)
        producer.flush()

    thread = threading.Thread(target=produce, name="producer")
    thread.start()
    try:
        _wait(lambda: len(_epochs(pipeline)) == pipeline.partitions, 90, "the first owner to seed every partition",
              [old, ledger])
        time.sleep(rng.uniform(2.0, 4.0))  # the first owner charges under load
        gate.close_gate()  # its next batch (taken within flush_s) blocks in the catalog probe, unemitted
        time.sleep(flush_s + 1.5)
        before = _epochs(pipeline)
        os.killpg(old.popen.pid, signal.SIGSTOP)  # frozen: it cannot heartbeat, emit or commit
        try:
            new = pipeline.start("streams", STREAMS_WORKER_INDEX="1")
            # the group evicts the frozen member (session timeout) and gives the new one every partition, which
            # takes a newer epoch on each before it seeds
            _wait(lambda: all(e > before[p] for p, e in _epochs(pipeline).items()), 120,
                  "the new owner to take every partition's epoch", [ledger, new])
            time.sleep(1.0)
        finally:
            os.killpg(old.popen.pid, signal.SIGCONT)  # wakes past its revocation, its batch still in hand
            gate.open_gate()
        _wait(lambda: _fenced(ledger) > 0, 30, "the ledger to refuse the old owner's checkpoints", [ledger])
        time.sleep(3.0)  # both workers in the group again (a second, ordinary rebalance) under load
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    last = producer.sent.last_offset
    pipeline.wait_applied(last, timeout_s=180, watch=[ledger])

    fenced = _fenced(ledger)
    assert fenced >= 1, "no checkpoint of an older owner epoch was refused"
    assert all(e >= 2 for e in _epochs(pipeline).values())  # the partitions really changed owners
    units: dict[str, Decimal] = defaultdict(Decimal)
    seen: set[object] = set()
    for ev in sent:
        if ev["id"] not in seen:
            seen.add(ev["id"])
            units[wallet_of(str(ev["subject"]))] += Decimal(ev["data"]["tokens"])  # type: ignore[index]
    expected = {w: -price_floor(u, Decimal("0.4")) for w, u in units.items()}
    assert pipeline.wallet_balances() == expected
    pipeline.assert_ledger_consistent()
