"""The sink against the real broker and a real ClickHouse engine: rows land exactly once, whatever is
redelivered (offset resets, inserts whose commit was lost, producer duplicates, killed processes)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics_testkit import usage_event, worker_dead_letters

from ledger.contracts import TOPIC_LEDGER_TRANSACTIONS
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS

pytestmark = pytest.mark.integration

T0 = datetime(2026, 10, 31, 23, 58, tzinfo=UTC)  # batches straddle a month partition boundary


def _scenario(topics: Any, producer: Any, *, project: str = "prj_a", messages: int = 120) -> dict[str, Any]:
    """Single and packed usage messages over 4 partitions, some invalid events, some producer duplicates, and
    transactions. Returns what the tables must hold, computed from what was sent."""
    rng = random.Random(7)
    usage_topic = topics.name(TOPIC_USAGE_EVENTS)
    valid_units = Decimal(0)
    valid = 0
    sent_ids: list[dict[str, Any]] = []
    for i in range(messages):
        subject = f"user_{i % 9}"
        moment = T0 + timedelta(seconds=i * 2)
        if i % 3 == 0:  # packed message: an array of events
            batch = [usage_event(project=project, subject=subject, units=str(Decimal(j + 1) / 4), time_=moment)
                     for j in range(rng.randint(2, 6))]
            valid += len(batch)
            valid_units += sum(Decimal(e["data"]["units"]) for e in batch)
            if i % 9 == 0:
                batch.append({"id": "bad", "type": "tokens"})  # invalid: no subject, project, source
            producer.send(usage_topic, batch, key=subject)
            sent_ids.extend(batch[:1])
        else:
            event = usage_event(project=project, subject=subject, units=i % 5 + 1, time_=moment)
            valid += 1
            valid_units += Decimal(event["data"]["units"])
            producer.send(usage_topic, event, key=subject)
            sent_ids.append(event)
    # producer duplicates: the same identities sent again in new messages (same key -> same partition)
    for event in sent_ids[:10]:
        producer.send(usage_topic, event, key=event["subject"])
    producer.send(usage_topic, b"{not json", key="user_0")
    tx_topic = topics.name(TOPIC_LEDGER_TRANSACTIONS)
    for n in range(1, 21):
        producer.send(tx_topic, {"transaction_id": n, "project_id": project, "wallet_id": f"w{n % 3}",
                                 "kind": "top_up" if n % 2 else "usage", "amount_minor": 100 if n % 2 else -30,
                                 "balance_before_minor": 0, "balance_after_minor": 0, "idempotency_key": f"k{n}",
                                 "created_at": (T0 + timedelta(minutes=n)).isoformat()}, key=f"w{n % 3}")
    for value, headers in worker_dead_letters(project, source_topic=usage_topic):
        producer.send(topics.name(TOPIC_USAGE_DLQ), value, headers=headers)
    producer.flush()
    return {"usage_rows": valid, "units": valid_units, "transactions": 20,
            "messages": {usage_topic: messages + 11, tx_topic: 20, topics.name(TOPIC_USAGE_DLQ): 2}}


def _counts(ch: Any, db: str) -> dict[str, Any]:
    usage = ch.query(f"SELECT count(), sum(units), uniqExact(kafka_topic, kafka_partition, kafka_offset, "
                     f"kafka_index), uniqExact(project_id, source, event_id) FROM `{db}`.usage_events").result_rows[0]
    by_minute = ch.query(f"SELECT sum(c), sum(u) FROM (SELECT toStartOfMinute(time) m, count() c, sum(units) u "
                         f"FROM `{db}`.usage_events GROUP BY project_id, event_type, m)").result_rows[0]
    tx = ch.query(f"SELECT count() FROM `{db}`.ledger_transactions FINAL").result_rows[0][0]
    tx_rows = ch.query(f"SELECT count() FROM `{db}`.ledger_transactions").result_rows[0][0]
    dl = ch.query(f"SELECT count(), groupUniqArray(reason), groupUniqArray(project_id) "
                  f"FROM `{db}`.dead_letters").result_rows[0]
    return {"rows": usage[0], "units": usage[1], "kafka_ids": usage[2], "event_ids": usage[3],
            "minute_rows": by_minute[0], "minute_units": by_minute[1], "tx": tx, "tx_rows": tx_rows,
            "dead_letters": dl}


def _assert_exact(counts: dict[str, Any], expected: dict[str, Any]) -> None:
    assert counts["rows"] == expected["usage_rows"]
    assert counts["kafka_ids"] == counts["rows"] == counts["event_ids"], "a row was written twice"
    assert counts["units"] == expected["units"]
    assert (counts["minute_rows"], counts["minute_units"]) == (expected["usage_rows"], expected["units"])
    assert counts["tx"] == counts["tx_rows"] == expected["transactions"]
    # the worker's dead letter (project header) and an older worker's (project only inside "original")
    assert counts["dead_letters"] == (2, ["missing_field"], ["prj_a"])


def test_everything_lands_once_and_a_full_replay_changes_nothing(topics, producer, ch, analytics_settings,
                                                                 run_sink):
    expected = _scenario(topics, producer)
    first = run_sink()
    first.wait_messages(expected["messages"])
    first.stop()
    db = analytics_settings.database
    _assert_exact(_counts(ch, db), expected)
    assert first.sink.stats.duplicates_dropped == 10
    assert first.sink.stats.rejected >= 5  # the invalid array members and the unparseable message

    # A consumer group that has committed nothing re-reads every message from offset 0.
    replay = run_sink(group_id=f"replay-{uuid.uuid4().hex[:6]}")
    replay.wait_messages(expected["messages"])
    replay.stop()
    _assert_exact(_counts(ch, db), expected)
    assert replay.sink.stats.redelivered_rows_skipped == expected["usage_rows"] + 20 + 2
    assert replay.sink.stats.inserted_rows == {}


@pytest.mark.slow
def test_sink_killed_with_sigkill_mid_stream_loses_and_doubles_nothing(topics, producer, analytics_settings,
                                                                       run_sink, tmp_path):
    """`meterline run analytics` (the sink process) is SIGKILLed repeatedly while messages stream in; a final
    sink in the same consumer group then finishes. Every event is stored exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from analytics.client import connect

    usage_topic = topics.name(TOPIC_USAGE_EVENTS)
    group = f"kill-{uuid.uuid4().hex[:6]}"
    sent = {"events": 0, "units": Decimal(0), "messages": 0}
    stop_producing = threading.Event()

    def produce() -> None:  # bounded: at most 3,000 messages, stops when asked
        i = 0
        while not stop_producing.is_set() and i < 3_000:
            batch = [usage_event(project="prj_k", subject=f"s{i % 13}", units=(i + j) % 7 + 1,
                                 time_=T0 + timedelta(seconds=i))
                     for j in range(1 + i % 4)]
            producer.send(usage_topic, batch if len(batch) > 1 else batch[0], key=f"s{i % 13}")
            sent["events"] += len(batch)
            sent["units"] += sum(Decimal(e["data"]["units"]) for e in batch)
            sent["messages"] += 1
            i += 1
            time.sleep(0.004)

    env = {**os.environ, "CLICKHOUSE_URL": analytics_settings.clickhouse_url,
           "ANALYTICS_DATABASE": analytics_settings.database, "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
           "METERLINE_TOPIC_PREFIX": topics.prefix, "ANALYTICS_CONSUMER_GROUP": group,
           "ANALYTICS_EMBEDDED_SINK_OWNER": "process", "ANALYTICS_BATCH_ROWS_MAX": "40",
           "ANALYTICS_BATCH_AGE_MS_MAX": "20"}
    # Migrate first, in a process of its own (chDB: one process per path at a time), so each killed sink spends
    # its few seconds consuming rather than creating the schema (ten versions take seconds on a loaded machine).
    subprocess.run([sys.executable, "-c", "import os; from analytics.client import connect; "
                    "from analytics.migrate import migrate; c = connect(os.environ['CLICKHOUSE_URL']); "
                    "migrate(c, database=os.environ['ANALYTICS_DATABASE']); c.close()"], env=env, check=True, timeout=120)
    feeder = threading.Thread(target=produce, daemon=True)
    feeder.start()
    rng = random.Random(11)
    kills = 0
    logs = []
    try:
        for round_ in range(4):
            log_path = tmp_path / f"sink-{round_}.log"
            with log_path.open("wb") as out:
                proc = subprocess.Popen([sys.executable, "-c", "from analytics.sink import main; main()"],
                                        env=env, stdout=out, stderr=subprocess.STDOUT)
            # kill it mid-stream: once it holds partitions (start-up time varies with the machine's load), after a
            # random few seconds of consuming
            deadline = time.monotonic() + 60
            while "partitions assigned" not in log_path.read_text(errors="replace") and proc.poll() is None:
                assert time.monotonic() < deadline, "a sink never got partitions within 60 s"
                time.sleep(0.1)
            time.sleep(rng.uniform(1.0, 4.0))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            kills += proc.returncode == -signal.SIGKILL
            logs.append(log_path.read_text(errors="replace"))
    finally:
        stop_producing.set()
        feeder.join(30)
    for i in range(20):  # a tail after the last kill, so the final sink surely has something to read
        event = usage_event(project="prj_k", subject=f"s{i % 13}", units=2, time_=T0)
        producer.send(usage_topic, event, key=f"s{i % 13}")
        sent["events"] += 1
        sent["units"] += 2
    producer.flush()
    assert kills == 4
    assert sum("partitions assigned" in text for text in logs) >= 2, "the killed sinks never got partitions"

    final = run_sink(group_id=group)
    final.wait_messages({usage_topic: 1}, timeout_s=60)  # joined and consuming
    client = connect(analytics_settings.clickhouse_url)
    try:
        def stored() -> int:
            return int(client.query(f"SELECT count() FROM `{analytics_settings.database}`.usage_events"
                                    ).result_rows[0][0])
        deadline = time.monotonic() + 90
        while stored() < sent["events"] and time.monotonic() < deadline:
            time.sleep(0.2)
        final.stop()
        counts = _counts(client, analytics_settings.database)
    finally:
        client.close()
    assert counts["rows"] == sent["events"]
    assert counts["kafka_ids"] == counts["event_ids"] == counts["rows"], "a row was stored twice"
    assert counts["units"] == sent["units"]
    assert (counts["minute_rows"], counts["minute_units"]) == (sent["events"], sent["units"])
    assert sent["messages"] > 500


def test_run_analytics_idles_when_the_api_owns_the_embedded_engine(analytics_settings, topics, tmp_path):
    """chDB: `meterline run analytics` must not open the path the api owns; it says so and idles until
    SIGTERM, then exits 0 (a crash loop under the supervisor would be the alternative)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not analytics_settings.embedded:
        pytest.skip("only meaningful for an embedded (chdb://) ClickHouse URL")  # server mode runs the sink
    env = {**os.environ, "CLICKHOUSE_URL": analytics_settings.clickhouse_url,
           "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap, "METERLINE_TOPIC_PREFIX": topics.prefix}
    env.pop("ANALYTICS_EMBEDDED_SINK_OWNER", None)
    log_path = tmp_path / "analytics.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from analytics.sink import main; main()"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "the api process owns analytics" not in log_path.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    time.sleep(1)
    assert proc.poll() is None, "it must idle, not exit"
    assert not (tmp_path / "clickhouse").exists(), "it must not open the embedded engine"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_dead_letters_stored_before_the_project_header_are_refiled_by_schema_0011(ch, analytics_settings,
                                                                                 topics):
    """Rows an older sink stored with project '' (the older worker's envelope: project only inside the
    "original" JSON string) are filed under their project by the 0011 migration, once."""
    from analytics.migrate import load_migrations
    from analytics.rows import DEAD_LETTER_COLUMNS

    db = analytics_settings.database
    _, legacy = worker_dead_letters("prj_old", source_topic=topics.name(TOPIC_USAGE_EVENTS))
    now = datetime.now(UTC)
    # what the sink stored for it before this change (its rows.py found no project in that shape)
    ch.insert(f"`{db}`.dead_letters", [["", now, "missing_field", legacy[0].decode(), '{"reason":"missing_field"}',
                                        "dlq", 0, 5, 0],
                                       ["", now, "bad_json", '{"original":"{not json"}', "{}", "dlq", 0, 6, 0]],
              column_names=list(DEAD_LETTER_COLUMNS))
    (backfill,) = [m for m in load_migrations() if m.version == 11]
    for _ in range(2):  # re-runnable: a second run changes nothing
        for statement in backfill.statements(db):
            ch.command(statement)
    rows = sorted(ch.query(f"SELECT project_id, kafka_offset FROM `{db}`.dead_letters").result_rows)
    assert rows == [("", 6), ("prj_old", 5)]
