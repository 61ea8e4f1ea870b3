"""The streams worker's and the ledger consumer's /health, /ready and /metrics (real processes, real broker).

- every /metrics parses with prometheus-client's own parser;
- the consumer lag of usage.events.v1 moves above 0 while a burst is being metered and comes back to 0 once the
  worker has caught up (lag = high watermark of the latest fetch − next offset to process; ledger/metrics.py);
- events are counted by outcome (they add up) and misplaced ones (outside their subject's partition) by note;
- dead letters are counted by reason; the ledger reports checkpoints applied, emit→apply latency and its lag.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import orjson
import pytest
from pipeline_harness import EventProducer, Pipeline, make_event, setup_catalog
from prometheus_client.parser import text_string_to_metric_families
from test_pipeline_scenarios import expected_balances

from meterline.services import free_port
from streams.contracts import partition_for

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str) -> Samples:
    r = httpx.get(f"{base_url}/metrics", timeout=5)
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def wait_ready(base_url: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/ready", timeout=5)
            body = r.json()
            if r.status_code == 200:
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base_url} not ready within {timeout_s} s: {body}")


def test_lag_moves_under_load_then_returns_to_zero_and_every_metric_parses(pipeline: Pipeline) -> None:
    setup_catalog(pipeline.database_url)
    streams_url, ledger_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    # batches of at most 2,000 messages, so that the backlog below takes many batches (each records the lag), and a
    # session that outlives the freeze below
    streams = pipeline.start("streams", STREAMS_METRICS_PORT=streams_url.rsplit(":", 1)[1],
                             STREAMS_CONSUME_MESSAGES_MAX="2000", STREAMS_BROKER_SESSION_TIMEOUT_S="20")
    ledger = pipeline.start("ledger", LEDGER_METRICS_PORT=ledger_url.rsplit(":", 1)[1])
    assert wait_ready(streams_url, 60)["checks"]["partitions"]["ok"]  # type: ignore[index]
    wait_ready(ledger_url, 60)
    assert httpx.get(f"{streams_url}/health").status_code == 200
    group = pipeline.env["STREAMS_APP_ID"]
    lag_name = "meterline_consumer_lag_messages"

    # a burst of one-event messages and two bad ones, produced while the worker is frozen (SIGSTOP): the batching
    # consumer meters faster than this test produces, so without the freeze a backlog — and a lag — was not certain
    # (a CI run saw the 40,002 messages metered in 3 batches and every scrape read 0)
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    events = [make_event(i, f"user-{i % 50}", 1) for i in range(40_000)]
    os.killpg(streams.popen.pid, signal.SIGSTOP)
    try:
        producer.send_raw(b"{not json", partition=0)
        producer.send_raw(orjson.dumps({"id": "x"}), partition=1)
        for event in events:
            producer.send_packed([event], pack=1)
        sent = producer.flush()
    finally:
        os.killpg(streams.popen.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    lag_seen = 0.0
    while lag_seen == 0 and time.monotonic() < deadline:
        lag_seen = max(lag_seen, total(scrape(streams_url), lag_name, group=f"{pipeline.prefix}{group}"))
        time.sleep(0.05)
    assert lag_seen > 0, "the lag never moved while a 40,000-message backlog was metered"

    pipeline.wait_applied(sent.last_offset, timeout_s=120, watch=[streams, ledger])
    lag_after: float | None = None
    until = time.monotonic() + 20
    while time.monotonic() < until:
        samples = scrape(streams_url)
        lag_after = total(samples, lag_name, group=f"{pipeline.prefix}{group}")
        if lag_after == 0:
            break
        time.sleep(0.3)
    assert lag_after == 0, f"the lag stayed at {lag_after} after everything was applied"
    owned = [ls for (n, ls), _ in samples.items() if n == lag_name]
    assert len(owned) == pipeline.partitions, "one lag sample per owned partition"

    assert total(samples, "meterline_dead_letters_total") == 2
    assert total(samples, "meterline_dead_letters_total", reason="bad_json") == 1, samples
    assert total(samples, "meterline_streams_checkpoints_total") > 0

    ledger_samples = scrape(ledger_url)
    assert total(ledger_samples, "meterline_ledger_checkpoints_total", outcome="applied") > 0
    assert total(ledger_samples, "meterline_ledger_checkpoint_emit_to_apply_seconds_count") > 0
    assert total(ledger_samples, "meterline_ledger_apply_seconds_count") > 0
    assert ("meterline_outbox_backlog_rows", ()) in ledger_samples
    ledger_group = pipeline.env["LEDGER_CONSUMER_GROUP"]
    until = time.monotonic() + 10
    while total(ledger_samples, lag_name, group=ledger_group) != 0 and time.monotonic() < until:
        time.sleep(0.5)
        ledger_samples = scrape(ledger_url)
    assert [ls for (n, ls), _ in ledger_samples.items() if n == lag_name], "the ledger reports its lag"
    assert total(ledger_samples, lag_name, group=ledger_group) == 0


def test_events_outside_their_subjects_partition_are_charged_and_counted_misplaced(pipeline: Pipeline) -> None:
    """A producer that does not partition by subject with murmur2 (librdkafka's default is CRC32): every event is
    still charged exactly once, a resend into the same partition is a duplicate, and the worker's event counters
    (what `meterline status` sums and explains) say how many were misplaced; the outcomes add up to the events."""
    setup_catalog(pipeline.database_url)
    streams_url = f"http://127.0.0.1:{free_port()}"
    streams = pipeline.start("streams", STREAMS_METRICS_PORT=streams_url.rsplit(":", 1)[1])
    ledger = pipeline.start("ledger")
    wait_ready(streams_url, 60)
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    events = [make_event(i, f"user-{i % 40}", i % 7 + 1) for i in range(600)]
    placed = 0
    for i, event in enumerate(events):
        home = partition_for(event["subject"], pipeline.partitions)
        partition = home if i % 3 == 0 else (home + 1) % pipeline.partitions  # two in three land elsewhere
        placed += partition == home
        times = 2 if i < 90 else 1  # the first 90 are sent twice into the same partition: duplicates
        for _ in range(times):
            producer.send_raw(orjson.dumps(event), partition=partition, key=event["subject"].encode())
    producer.send_raw(orjson.dumps({"id": "x"}), partition=0)  # one bad event: rejected
    pipeline.wait_applied(producer.flush().last_offset, timeout_s=90, watch=[streams, ledger])
    assert pipeline.wallet_balances() == expected_balances(events)
    pipeline.assert_ledger_consistent()

    outcomes: dict[str, float] = {}
    deadline = time.monotonic() + 20  # the counters are added after the batch's checkpoints are acknowledged
    while time.monotonic() < deadline:
        samples = scrape(streams_url)
        outcomes = {o: total(samples, "meterline_streams_events_total", outcome=o)
                    for o in ("accepted", "duplicate", "rejected", "unmetered")}
        if sum(outcomes.values()) >= 691:
            break
        time.sleep(0.3)
    assert outcomes == {"accepted": 600, "duplicate": 90, "rejected": 1, "unmetered": 0}, outcomes
    assert total(samples, "meterline_streams_event_notes_total", note="misplaced") == 600 - placed == 400
