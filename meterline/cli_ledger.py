"""`meterline ledger verify [--project]`: recompute every wallet's hash chain and balance invariants
(ledger/chain.py) in one REPEATABLE READ snapshot and name the first broken link of each wallet.
Exit 0: intact; 1: something is broken; 2: cannot run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
ledger_app = typer.Typer(help="Check the ledger.", no_args_is_help=True)


@ledger_app.command("verify")
def verify(project: Annotated[str | None, typer.Option(help="only this project's wallets")] = None,
           show: Annotated[int, typer.Option(min=1, max=10_000, help="breaks to print")] = 50) -> None:
    """Recompute the hash chain and balance invariants of every wallet; name the first broken link."""
    from sqlalchemy import text

    from ledger.chain import verify as verify_chain
    from ledger.db import make_engine
    from meterline.urls import EngineUrlMissing, engine_url

    try:
        database_url = engine_url("database_url")
    except EngineUrlMissing as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    engine = make_engine(database_url, pool_size=1, application_name="meterline-ledger-verify")
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():  # one instant of a live ledger
                total = conn.execute(text("SELECT count(*) FROM transactions"
                                          + (" WHERE project_id = :p" if project else "")), {"p": project}).scalar_one()
                columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
                with Progress(*columns, console=console) as bar:
                    task = bar.add_task("verify", total=int(total))
                    report = verify_chain(conn, project_id=project, progress=lambda n: bar.advance(task, n))
    finally:
        engine.dispose()
    console.print(f"{report.transactions:,} transactions of {report.wallets:,} wallets in {report.seconds:.2f} s")
    if report.ok:
        console.print("[green]every chain and balance is intact[/]")
        return
    table = Table(title=f"{len(report.breaks)} broken")
    for column in ("wallet", "first broken transaction", "after transaction", "problem"):
        table.add_column(column)
    for b in report.breaks[:show]:
        table.add_row(b.wallet_id, str(b.transaction_id or "-"), str(b.previous_id or "-"), b.problem)
    Console().print(table)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")
