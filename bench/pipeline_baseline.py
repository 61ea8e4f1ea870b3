"""The naive baseline of bench/pipeline.py: faust as its documentation shows it — one event per Kafka
message, a ``faust.Record`` value, and a table update per event (``table[key] += units``).

    python -m bench.pipeline_baseline   # env: BASELINE_APP_ID, BASELINE_TOPIC, BASELINE_BROKER, BASELINE_PROGRESS

It writes the number of events it processed to BASELINE_PROGRESS every 200 ms (the bench sums the files of
its workers to know when everything was consumed — end offsets are wrong on this broker). It charges no
ledger and keeps no exactly-once protocol, so it is an UPPER bound of what the naive design reaches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faust


class UsageRecord(faust.Record, serializer="json"):
    id: str
    source: str
    type: str
    subject: str
    project: str
    time: str
    data: dict  # type: ignore[type-arg]


def main() -> None:
    app = faust.App(
        os.environ["BASELINE_APP_ID"],
        broker=f"kafka://{os.environ['BASELINE_BROKER']}",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.5,
        topic_disable_leader=True,
        web_enabled=False,
        store="memory://",
        datadir=tempfile.mkdtemp(prefix="bench-baseline-"),
        topic_partitions=int(os.environ.get("BASELINE_PARTITIONS", "8")),
    )
    topic = app.topic(os.environ["BASELINE_TOPIC"], value_type=UsageRecord)
    totals = app.Table("usage_totals", default=int)
    progress = Path(os.environ["BASELINE_PROGRESS"])
    done = {"n": 0}

    @app.agent(topic)
    async def meter(stream: faust.StreamT[UsageRecord]) -> None:
        async for event in stream:  # messages are keyed by subject: co-partitioned with the table
            totals[event.subject] += int(event.data["tokens"])
            done["n"] += 1

    @app.timer(interval=0.2)
    async def report() -> None:
        progress.write_text(str(done["n"]))

    app.main()


if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    main()
