"""`meterline payments reconcile`: ask RevenueCat and Lemon Squeezy what was bought and apply what no webhook
brought (api/payments/reconciliation.py), for one project or every configured one, with a progress bar.
Needs the database (``DATABASE_URL`` or the running local stack). Exit 0 when every run was clean or fixed
something, 1 when a provider answered errors (reported; the next run retries), 2 when it cannot run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, help="Payments: reconcile receipts with the providers' APIs.")


@app.command("reconcile")
def reconcile(project: Annotated[str | None, typer.Option("--project", "-p", envvar="METERLINE_PROJECT",
                                                          help="one project (default: every configured one)")] = None,
              provider: Annotated[str | None, typer.Option(help="revenuecat or lemonsqueezy (default: both)")] = None
              ) -> None:
    """Read each provider's purchases and subscriptions; apply the missing ones through the webhook handlers."""
    from api.payments.reconcile_settings import ReconcileSettings
    from api.payments.reconciliation import PROVIDERS, reconcile_all
    from ledger.db import make_engine
    from meterline.urls import EngineUrlMissing, engine_url

    if provider is not None and provider not in PROVIDERS:
        console.print(f"[bold red]error:[/] --provider is one of {', '.join(PROVIDERS)}")
        raise typer.Exit(2)
    try:
        url = engine_url("database_url")
    except EngineUrlMissing as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    engine = make_engine(url, pool_size=2, application_name="meterline-cli-payments")
    tasks: dict[str, TaskID] = {}
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            def progress(name: str, done: int, total: int | None) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total)
                bar.update(tasks[name], completed=done, total=total)

            found = reconcile_all(engine, ReconcileSettings(), trigger="cli", project_id=project,
                                  providers=(provider,) if provider else PROVIDERS, progress=progress)
    finally:
        engine.dispose()
    table = Table("project", "provider", "status", "checked", "fixed", "errors", "report")
    for r in found:
        table.add_row(r.project_id, r.provider, r.status, str(r.checked), str(r.fixed), str(len(r.errors)),
                      str(r.id))
    console.print(table)
    for r in found:
        for fix in r.fixes:
            console.print(f"  {r.provider} {fix['status']}: {fix['what']}" + (f" ({fix['detail']})" if
                                                                              fix.get("detail") else ""))
        for error in r.errors:
            console.print(f"  [red]{r.provider} {error.get('kind')}:[/] {error.get('detail')}")
        for note in r.notes:
            console.print(f"  [dim]{r.provider}: {note}[/]")
    if not found:
        console.print("nothing to reconcile: no project has a RevenueCat or Lemon Squeezy api_key")
    raise typer.Exit(1 if any(r.errors for r in found) else 0)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="payments")
