"""Issue 17: the dedupe horizon stays exact when the keys no longer fit the RAM budget. A real broker and real
worker/ledger processes; Kafka CreateTime is producer-set, so a day of stream time passes in seconds. The worker
keeps 1,000 keys in RAM; 2,401 keys arrive over 23 h, so the first one is on disk when its retry comes; after a
restart the new owner streams the horizon from the ledger onto disk and still catches a 23 h old retry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pipeline_harness import EventProducer, Pipeline, make_event, setup_catalog, wallet_of

from streams.contracts import partition_for

pytestmark = pytest.mark.integration
CREDITS_PER_EVENT = 4  # 10 tokens at 0.4: every event charges a whole amount, whatever its period


def test_a_retry_23_hours_later_is_caught_from_disk_also_after_a_restart_and_not_after_the_horizon(
        pipeline: Pipeline, tmp_path: Path) -> None:
    setup_catalog(pipeline.database_url)
    small = {"STREAMS_DEDUPE_MEMORY_MAX": "1000", "STREAMS_DEDUPE_FILTER_MB": "1", "STREAMS_DEDUPE_DIR": str(tmp_path)}
    worker = pipeline.start("streams", **small)
    ledger = pipeline.start("ledger")
    producer = EventProducer(pipeline.bootstrap, pipeline.usage_topic, pipeline.partitions)
    p = partition_for("alice", pipeline.partitions)
    t0 = (datetime.now(UTC) - timedelta(hours=26)).replace(second=0, microsecond=0)

    def send(event_ids: list[int], at: datetime) -> None:
        events = [make_event(i, "alice", 10, time=at) for i in event_ids]
        producer.send_raw(orjson.dumps(events), partition=p, timestamp_ms=int(at.timestamp() * 1000))

    def settle() -> None:
        pipeline.wait_applied(producer.flush().last_offset, timeout_s=90, watch=[worker, ledger])

    def charged_events() -> int:
        balance = pipeline.wallet_balances().get(wallet_of("alice"), 0)
        assert balance % CREDITS_PER_EVENT == 0
        return -balance // CREDITS_PER_EVENT

    send([1], t0)
    for k in range(24):  # 2,400 other events spread over the next 23 h: the RAM tier spills to disk
        send(list(range(1_000 + 100 * k, 1_100 + 100 * k)), t0 + timedelta(hours=23) * (k + 1) / 25)
    send([1], t0 + timedelta(hours=23))  # the retry, 23 h of stream time later
    settle()
    assert charged_events() == 2_401

    # one slot (60 s) past the horizon the first event's key is forgotten (at the checkpoint that moved stream
    # time there — forgetting is lazy, which only ever errs towards catching): a resend is a new event
    send([3], t0 + timedelta(hours=24, minutes=2))
    settle()
    send([1], t0 + timedelta(hours=24, minutes=2))
    settle()
    assert charged_events() == 2_403

    worker.stop()
    worker = pipeline.start("streams", **small)  # seeds every key of the horizon from the ledger, old ones to disk
    send([1_000, 1], t0 + timedelta(hours=24, minutes=3))  # 1,000 first came ~23 h 8 min earlier in stream time
    send([4], t0 + timedelta(hours=24, minutes=3))
    settle()
    assert charged_events() == 2_404
    seeded = [line for line in _json_lines(worker.log_path) if line.get("event") == "partition_seeded"]
    mine = [line for line in seeded if line.get("partition") == p]
    assert mine and mine[-1]["dedupe_on_disk"] >= 1_000, seeded  # the old keys were seeded onto disk
    pipeline.assert_ledger_consistent()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return out
