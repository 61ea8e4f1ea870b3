"""`meterline export transactions|usage|balances --from --to --format csv|parquet`: a finance export of a time
range (ledger/exports.py), streamed from one REPEATABLE READ snapshot into a file with a progress bar."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class What(StrEnum):
    transactions = "transactions"
    usage = "usage"
    balances = "balances"


class FileFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def export(what: Annotated[What, typer.Argument(help="transactions, usage (charged keys by period) or balances")],
           since: Annotated[datetime, typer.Option("--from", help="start, inclusive (UTC unless an offset is given)")],
           until: Annotated[datetime, typer.Option("--to", help="end, exclusive")],
           fmt: Annotated[FileFormat, typer.Option("--format", help="csv or parquet")] = FileFormat.csv,
           project: Annotated[str | None, typer.Option(help="only this project")] = None,
           output: Annotated[Path | None, typer.Option("--output", "-o",
                                                       help="file to write ('-' = stdout, csv only); default "
                                                            "<what>-<from>-<to>.<format>")] = None,
           batch: Annotated[int, typer.Option(min=100, max=1_000_000, help="rows per fetch / row group")] = 10_000,
           ) -> None:
    """Export a time range of the ledger for finance (CSV or Parquet), streamed; transaction rows carry their
    chain hash."""
    from ledger.db import make_engine
    from ledger.exports import EXPORTS, count_rows, encode, stream_rows
    from meterline.urls import EngineUrlMissing, engine_url

    start, end = _utc(since), _utc(until)
    if start >= end:
        console.print("[bold red]error:[/] --from must be before --to")
        raise typer.Exit(2)
    if str(output) == "-" and fmt is FileFormat.parquet:
        console.print("[bold red]error:[/] parquet needs a file (--output PATH)")
        raise typer.Exit(2)
    try:
        database_url = engine_url("database_url")
    except EngineUrlMissing as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    path = output or Path(f"{what.value}-{start:%Y%m%dT%H%M%S}-{end:%Y%m%dT%H%M%S}.{fmt.value}")
    spec = EXPORTS[what.value]
    engine = make_engine(database_url, pool_size=1, application_name="meterline-export")
    started = time.monotonic()
    rows = 0
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():  # one instant of a live ledger
                total = count_rows(conn, spec, since=start, until=end, project_id=project)
                columns = (TextColumn(f"exporting {what.value}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn())
                with Progress(*columns, console=console) as bar:
                    task = bar.add_task(what.value, total=total)

                    def advanced(n: int) -> None:
                        nonlocal rows
                        rows += n
                        bar.advance(task, n)

                    chunks = encode(spec, stream_rows(conn, spec, since=start, until=end, project_id=project,
                                                      batch=batch), fmt.value, on_rows=advanced)
                    if str(path) == "-":
                        for chunk in chunks:
                            sys.stdout.buffer.write(chunk)
                        sys.stdout.buffer.flush()
                    else:
                        with path.open("wb") as out:
                            for chunk in chunks:
                                out.write(chunk)
    finally:
        engine.dispose()
    seconds = time.monotonic() - started
    where = "stdout" if str(path) == "-" else str(path)
    console.print(f"{rows:,} rows → {where} in {seconds:.2f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
