"""`meterline replay`: meter a range of usage.events.v1 again, report how far the ledger is from it per wallet,
meter and period, and with ``--apply`` repair it once with compensating ``adjustment`` transactions.

Steps (the invariant each protects):
1. ONE REPEATABLE READ snapshot: the topic life, its applied marks, the ledger's counters of that life (and
   earlier corrections) and the catalog → the comparison never mixes two instants of a live ledger.
2. Each selected partition is read from its first offset up to the mark (a price is a function of the period's
   cumulative units, so a key is compared whole; the range only selects keys) and metered with the workers'
   own core (``streams.replay_diff``); a progress bar counts messages.
3. The difference per key, with the money it means at today's state (``ledger.corrections.key_state``).
4. ``--apply``: one PostgreSQL transaction posts every repairable correction (``ledger.corrections``):
   deterministic replay id → deterministic idempotency keys and a virtual source whose applied mark makes a
   re-run ``stale``; a fresh replay then reports zero. History is never edited.
Exit 0: no difference (or all applied); 1: differences left; 2: cannot run."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _aware(value: datetime | None) -> datetime | None:
    from datetime import UTC

    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def replay(
    partition: Annotated[list[int] | None, typer.Option("--partition", "-p", help="only these partitions")] = None,
    from_offset: Annotated[int | None, typer.Option(min=0, help="first offset of the range (every partition)")] = None,
    to_offset: Annotated[int | None, typer.Option(min=0, help="last offset of the range (inclusive)")] = None,
    since: Annotated[datetime | None, typer.Option("--from", help="range start, message time (UTC unless given)")] = None,
    until: Annotated[datetime | None, typer.Option("--to", help="range end, exclusive")] = None,
    project: Annotated[str | None, typer.Option(help="only this project's keys")] = None,
    subject: Annotated[list[str] | None, typer.Option(help="only these subjects' wallets (needs --project)")] = None,
    meter: Annotated[list[str] | None, typer.Option(help="only these meters (id, or slug with --project)")] = None,
    output: Annotated[Format, typer.Option("--format", help="table, json or csv (to stdout)")] = Format.table,
    apply: Annotated[bool, typer.Option("--apply", help="post the differences as adjustments, once")] = False,
    timeout_s: Annotated[float, typer.Option(min=1, max=86_400, help="give up reading after this long")] = 600.0,
) -> None:
    """Replay usage.events.v1 (a range, optionally one project/subject/meter), report the difference per wallet,
    meter and period, and with --apply post it once as compensating adjustments."""
    from ledger.kafka import require_topics, topic_name
    from meterline.urls import EngineUrlMissing, engine_url
    from streams.contracts import TOPIC_USAGE_EVENTS
    from streams.settings import get_settings as streams_settings

    if subject and not project:
        _fail("--subject needs --project")
    try:
        database_url, bootstrap = engine_url("database_url"), engine_url("kafka_bootstrap_servers")
    except EngineUrlMissing as exc:
        _fail(str(exc))
    settings = streams_settings()
    topic = topic_name(TOPIC_USAGE_EVENTS, settings.topic_prefix)
    try:
        partitions = require_topics(bootstrap, [topic])[topic]
    except Exception as exc:
        _fail(str(exc))
    wanted = sorted(set(partition)) if partition else list(range(partitions))
    if any(p < 0 or p >= partitions for p in wanted):
        _fail(f"{topic} has partitions 0..{partitions - 1}")
    result = run_replay(database_url=database_url, bootstrap=bootstrap, topic=topic, partitions=partitions,
                        wanted=wanted, from_offset=from_offset, to_offset=to_offset, since=_aware(since),
                        until=_aware(until), project=project, subjects=subject or [], meters=meter or [],
                        apply=apply, timeout_s=timeout_s)
    _print(result, output)
    if result["incomplete_partitions"] or (result["differences"] and not result["applied"]) \
            or result["unrepairable"]:
        raise typer.Exit(1)


def _fail(message: str) -> Any:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def run_replay(*, database_url: str, bootstrap: str, topic: str, partitions: int, wanted: Sequence[int],
               from_offset: int | None, to_offset: int | None, since: datetime | None, until: datetime | None,
               project: str | None, subjects: Sequence[str], meters: Sequence[str], apply: bool,
               timeout_s: float) -> dict[str, Any]:
    """The whole replay (also what tests and the benchmark call); returns the report as plain data."""
    from ledger import corrections, queries
    from ledger.db import make_engine
    from ledger.source_logs import current_identity
    from meterline.cli_reconcile import _read_partition
    from streams import catalog as catalog_db
    from streams.catalog_model import ProjectPolicy, auto_wallet_id
    from streams.replay import LogMessage, metering_limits
    from streams.replay_diff import Selection, diff_keys, drift_rows, replay_id, replay_partition
    from streams.settings import get_settings as streams_settings

    settings = streams_settings()
    engine = make_engine(database_url, pool_size=1, application_name="meterline-replay")
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():  # marks, the ledger's counters and the catalog from one snapshot (step 1)
                source_id = current_identity(conn, topic)
                marks = queries.applied_offsets(conn, source_id, list(wanted))
                life = corrections.life_counters(conn, source_id, project_id=project)
                catalog = catalog_db.load_catalog(conn, default_policy=ProjectPolicy(
                    settings.unknown_subjects, settings.allowed_lateness_s))  # type: ignore[arg-type]
        wallet_ids = None
        if subjects:
            assert project is not None
            wallet_ids = frozenset(catalog.wallets_by_subject.get((project, s)) or auto_wallet_id(project, s)
                                   for s in subjects)
        meter_ids = None
        if meters:
            known = [m for ms in catalog.meters_by_type.values() for m in ms]
            meter_ids = frozenset(m.id for m in known if m.id in meters or (m.slug in meters and m.project_id == project))
            if not meter_ids:
                _fail(f"no meter {', '.join(meters)}" + ("" if project else " (a slug needs --project)"))
        selection = Selection(partitions=tuple(wanted), from_offset=from_offset, to_offset=to_offset, since=since,
                              until=until, project_id=project, wallet_ids=wallet_ids, meter_ids=meter_ids)
        rid = replay_id(source_id=source_id, marks=marks, selection=selection)

        deadline = time.monotonic() + timeout_s
        limits = metering_limits(settings)
        started = time.monotonic()
        runs = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(f"replaying {topic} ({source_id})", total=sum(max(marks[p] + 1, 0) for p in wanted))
            for p in wanted:
                through = marks[p]
                raw = _read_partition(bootstrap, topic, p, through, deadline) if through >= 0 else iter(())

                def counted(stream: Iterator[tuple[int, bytes | None, datetime]]) -> Iterator[LogMessage]:
                    for offset, value, arrival in stream:
                        bar.advance(task)
                        yield LogMessage(offset, value, arrival)

                runs.append(replay_partition(source_id=source_id, partition=p, partitions=partitions,
                                             applied_through=through, messages=counted(raw), catalog=catalog,
                                             limits=limits, selection=selection))
        replay_s = time.monotonic() - started
        candidates = {k for r in runs for k in r.counters} | {c.key for c in life}
        with engine.connect() as conn, conn.begin():
            every, charges = corrections.key_state(conn, sorted(candidates, key=lambda k: (k[0], k[2], k[3], k[4])))
        drifts = diff_keys(runs, source_id=source_id, selection=selection, life=life, every=every, charges=charges)
        applied = None
        repairable = [d.correction for d in drifts if d.correction is not None]
        if apply and repairable:
            with engine.begin() as conn:  # step 4: one transaction, exactly once per replay id
                outcome = corrections.apply_correction(conn, source_id=source_id, replay_id=rid, counters=repairable)
            applied = {"outcome": outcome.status, "keys": outcome.keys, "transactions": outcome.transactions,
                       "amount_minor": outcome.charged_minor}
    finally:
        engine.dispose()
    return {
        "replay_id": rid, "source": source_id, "marks": {str(p): m for p, m in marks.items()},
        "messages": sum(r.messages for r in runs), "replay_s": round(replay_s, 3),
        "incomplete_partitions": [r.partition for r in runs if not r.complete],
        "differences": list(drift_rows(drifts)),
        "amount_minor": sum(d.amount_minor for d in drifts if d.correction is not None),
        "unrepairable": sum(1 for d in drifts if d.correction is None),
        "applied": applied,
    }


_COLUMNS = ("wallet_id", "meter_id", "period_start", "price_version_id", "ledger_units", "replayed_units",
            "amount_minor", "repairable")


def _print(result: dict[str, Any], output: Format) -> None:
    rows = result["differences"]
    if output is Format.json:
        print(json.dumps(result, indent=2, default=str))
        return
    if output is Format.csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["project_id", *_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
        print(buffer.getvalue(), end="")
        return
    table = Table(title=f"replay {result['replay_id']} of {result['source']}: {result['messages']:,} messages, "
                        f"{len(rows)} keys differ")
    for column in _COLUMNS:
        table.add_column(column.replace("_", " "), justify="right" if "units" in column or "amount" in column
                         else "left")
    for row in rows:
        table.add_row(*(str(row[c]) for c in _COLUMNS))
    Console().print(table)
    if result["incomplete_partitions"]:
        console.print(f"[yellow]log ends before the ledger's mark in partitions {result['incomplete_partitions']}[/]")
    if result["applied"]:
        a = result["applied"]
        console.print(f"--apply: {a['outcome']} — {a['transactions']} adjustments, {a['amount_minor']} minor charged "
                      f"net, replay id {result['replay_id']}")
    elif rows:
        console.print(f"{result['amount_minor']} minor would be charged net; run with --apply to post it once")


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
