"""`meterline reconcile`: replay the usage topic and check the ledger against it.

Reads every partition of ``usage.events.v1`` from its first offset up to the offset the ledger says it applied,
meters it again with the live workers' own core (``streams/replay.py``) and compares the cumulative counters,
key by key, with what the ledger stores for the topic's current life. Read-only: it never writes to the
ledger or commits a consumer offset. Exit 0 when everything matches, 1 on a difference, 2 when it cannot run.
Bounded in time (``--timeout-s``); a partition whose log ends before the ledger's mark is reported incomplete."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


def _read_partition(bootstrap: str, topic: str, partition: int, through: int,
                    deadline: float) -> Iterator[tuple[int, bytes | None, datetime]]:
    """The partition's messages from offset 0 up to ``through`` (no group, no commits). The broker's high
    watermark is not trusted here (DESIGN §5): the ledger's mark says where to stop, the deadline bounds it."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from ledger.kafka import make_consumer, message_position

    # RAM bounded whatever the range (issue 18): librdkafka prefetches at most 16 MiB, and a batch is at most 500
    # messages (a message is at most the broker's message.max.bytes); a message is dropped once metered
    consumer = make_consumer(bootstrap, f"meterline-reconcile-{uuid.uuid4().hex}",
                             **{"enable.auto.commit": False, "queued.max.messages.kbytes": 16 * 1024})
    try:
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        idle_polls = 0
        while time.monotonic() < deadline and idle_polls < 20:
            batch = consumer.consume(num_messages=500, timeout=0.5)
            if not batch:
                idle_polls += 1  # ~10 s without a message: the log ends before the mark
                continue
            idle_polls = 0
            for msg in batch:
                if msg.error() is not None:
                    continue
                _, _, offset = message_position(msg)
                if offset > through:
                    return
                kind, ts_ms = msg.timestamp()
                arrival = datetime.fromtimestamp(ts_ms / 1000, UTC) if kind and ts_ms > 0 else datetime.now(UTC)
                yield offset, msg.value(), arrival
                if offset == through:
                    return
    finally:
        consumer.close()


def reconcile(partition: Annotated[list[int] | None, typer.Option("--partition", "-p",
                                                                  help="only these partitions (repeatable)")] = None,
              timeout_s: Annotated[float, typer.Option(min=1, max=86_400, help="give up after this long")] = 300.0,
              show: Annotated[int, typer.Option(min=0, max=10_000, help="differences to print")] = 20) -> None:
    """Replay usage.events.v1 and compare it with the ledger's counters (read-only; exit 1 on a difference)."""
    from ledger import queries
    from ledger.db import make_engine
    from ledger.kafka import require_topics, topic_name
    from ledger.source_logs import current_identity
    from meterline.urls import EngineUrlMissing, engine_url
    from streams import catalog as catalog_db
    from streams.catalog_model import ProjectPolicy
    from streams.contracts import TOPIC_USAGE_EVENTS
    from streams.replay import LogMessage, PartitionReplay, compare, metering_limits, replay_messages
    from streams.settings import get_settings as streams_settings

    try:
        database_url, bootstrap = engine_url("database_url"), engine_url("kafka_bootstrap_servers")
    except EngineUrlMissing as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    settings = streams_settings()
    topic = topic_name(TOPIC_USAGE_EVENTS, settings.topic_prefix)
    try:
        partitions = require_topics(bootstrap, [topic])[topic]
    except Exception as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    wanted = sorted(set(partition)) if partition else list(range(partitions))
    if any(p < 0 or p >= partitions for p in wanted):
        console.print(f"[bold red]error:[/] {topic} has partitions 0..{partitions - 1}")
        raise typer.Exit(2)

    engine = make_engine(database_url, pool_size=1, application_name="meterline-reconcile")
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():  # marks, counters and catalog from one snapshot
                source_id = current_identity(conn, topic)
                snapshot = queries.partition_snapshot(conn, source_id, wanted)
                catalog = catalog_db.load_catalog(conn, default_policy=ProjectPolicy(
                    settings.unknown_subjects, settings.allowed_lateness_s))  # type: ignore[arg-type]
    finally:
        engine.dispose()

    deadline = time.monotonic() + timeout_s
    limits = metering_limits(settings)
    results: list[PartitionReplay] = []
    total = sum(max(snapshot.applied_through[p] + 1, 0) for p in wanted)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"replaying {topic} ({source_id})", total=total)
        for p in wanted:
            through = snapshot.applied_through[p]
            replay = PartitionReplay(partition=p, applied_through=through)
            messages = (LogMessage(offset, value, arrival) for offset, value, arrival
                        in _read_partition(bootstrap, topic, p, through, deadline)) if through >= 0 else iter(())

            def advanced(stream: Iterator[LogMessage]) -> Iterator[LogMessage]:
                for message in stream:
                    bar.advance(task)
                    yield message

            aggregator = replay_messages(source_id=source_id, partition=p, partitions=partitions,
                                         applied_through=through, messages=advanced(messages), catalog=catalog,
                                         limits=limits)
            results.append(compare(replay, aggregator, snapshot.counters))

    _report(results, show=show)
    if any(r.differences or not r.complete for r in results):
        raise typer.Exit(1)


def _report(results: Sequence[object], *, show: int) -> None:
    from streams.replay import PartitionReplay

    table = Table(title="ledger vs. replayed usage log")
    # partition | ledger's applied offset | replayed through | messages | events counted | duplicates |
    # rejected | keys in the ledger / in the replay | keys that differ
    for column in ("part.", "applied", "replayed", "msgs", "events", "dups", "rejected", "keys L/R", "diffs"):
        table.add_column(column, justify="right")
    shown = 0
    details: list[str] = []
    for r in results:
        assert isinstance(r, PartitionReplay)
        verdict = "[green]0[/]" if not r.differences else f"[red]{len(r.differences)}[/]"
        if not r.complete:
            verdict += " [yellow](log ends early)[/]"
        table.add_row(str(r.partition), str(r.applied_through), str(r.replayed_through), f"{r.messages:,}",
                      f"{r.accepted:,}", f"{r.duplicates:,}", f"{r.rejected:,}",
                      f"{r.keys_ledger:,} / {r.keys_replayed:,}", verdict)
        for d in r.differences:
            if shown < show:
                wallet, _project, meter, period, version = d.key
                details.append(f"p{r.partition} wallet {wallet} meter {meter} period {period:%Y-%m-%d} "
                               f"price {version}: ledger {d.ledger_units} units / {d.ledger_events} events, "
                               f"log {d.replayed_units} units / {d.replayed_events} events")
                shown += 1
    Console().print(table)
    for line in details:
        console.print(line)
    if any(r.differences for r in results):  # type: ignore[attr-defined]
        console.print("[yellow]note:[/] a catalog change after the events were metered (replay uses today's meters "
                      "and prices) also shows up here; see streams/replay.py")


def register(app: typer.Typer) -> None:
    app.command("reconcile")(reconcile)
