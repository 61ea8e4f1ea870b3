"""`meterline events send FILE|-` and `meterline loadgen`: the SDK from the command line.

The API key comes from ``--api-key`` or ``METERLINE_API_KEY``; the URL from ``--url``, ``METERLINE_API_URL``
or the local stack's address. loadgen is bounded in count AND time and only targets 127.0.0.1 (it exists
to exercise a local stack, never someone else's server)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)

ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="METERLINE_API_KEY",
                                               help="an API key with the ingest scope (mlk_...)")]
UrlOpt = Annotated[str | None, typer.Option("--url", envvar="METERLINE_API_URL",
                                            help="API base URL (default: the local stack)")]


def _base_url(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    from meterline.settings import get_settings

    settings = get_settings()
    return f"http://{settings.api_host}:{settings.api_port}"


def _require_key(api_key: str | None) -> str:
    if not api_key:
        console.print("[bold red]error:[/] pass --api-key or set METERLINE_API_KEY "
                      "(create one: POST /api/v1/projects/{id}/api-keys)")
        raise typer.Exit(2)
    return api_key


def send(file: Annotated[str, typer.Argument(help="JSON lines or a JSON array of events; - for stdin")],
         api_key: ApiKeyOpt = None, url: UrlOpt = None,
         batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 500) -> None:
    """Send usage events (CloudEvents) from a file or stdin; prints accepted/rejected. Exit 1 if any rejected."""
    from meterline.client import DeliveryFailed, MeterlineClient, RequestRejected, read_events

    key = _require_key(api_key)
    try:
        if file == "-":
            events = list(read_events(sys.stdin))
        else:
            with Path(file).open(encoding="utf-8") as handle:
                events = list(read_events(handle))
    except (OSError, ValueError) as exc:
        console.print(f"[bold red]error:[/] cannot read events from {file}: {exc}")
        raise typer.Exit(2) from None
    columns = (TextColumn("sending"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with MeterlineClient(_base_url(url), key, batch_size=batch_size) as client, \
            Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("events", total=len(events))
        try:
            result = client.send(events, on_batch=lambda n, _r: progress.advance(task, n))
        except DeliveryFailed as exc:
            console.print(f"[bold red]failed:[/] {exc}; accepted so far {exc.result.accepted}, "
                          f"unconfirmed {exc.unconfirmed} (resend them: ids are kept, resending is harmless)")
            raise typer.Exit(1) from None
        except RequestRejected as exc:
            console.print(f"[bold red]refused:[/] {exc}")
            raise typer.Exit(1) from None
    table = Table(title="events send")
    table.add_column("accepted", justify="right")
    table.add_column("rejected", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("retries", justify="right")
    table.add_row(str(result.accepted), str(len(result.rejected)), str(result.requests), str(result.retries))
    Console().print(table)
    for rejected in result.rejected[:20]:
        console.print(f"  [yellow]#{rejected['index']}[/] id={rejected.get('id')}: {rejected['reason']}")
    if len(result.rejected) > 20:
        console.print(f"  … and {len(result.rejected) - 20} more")
    raise typer.Exit(1 if result.rejected else 0)


def loadgen(api_key: ApiKeyOpt = None, url: UrlOpt = None,
            rate: Annotated[float, typer.Option(min=1, help="target events per second")] = 1000.0,
            wallets: Annotated[int, typer.Option(min=1, help="distinct subjects")] = 100,
            duration: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds, at most")] = 10.0,
            max_events: Annotated[int, typer.Option(min=1, max=50_000_000, help="events, at most")] = 100_000,
            batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 500,
            event_type: Annotated[str, typer.Option("--type")] = "tokens",
            source: Annotated[str, typer.Option()] = "loadgen") -> None:
    """Send synthetic usage events to a LOCAL stack at a steady rate, bounded in count and time."""
    from meterline.client import DeliveryFailed, MeterlineClient, usage_event

    key = _require_key(api_key)
    base = _base_url(url)
    host = urlparse(base).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[bold red]error:[/] loadgen only targets 127.0.0.1 (got {host})")
        raise typer.Exit(2)
    sent = 0
    started = time.monotonic()
    stop_at = started + duration
    with MeterlineClient(base, key, batch_size=batch_size) as client:
        try:
            while sent < max_events and time.monotonic() < stop_at:
                n = min(batch_size, max_events - sent)
                batch = [usage_event(type=event_type, subject=f"wallet-{(sent + i) % wallets}", source=source,
                                     data={"tokens": 1 + (sent + i) % 100}) for i in range(n)]
                client.send(batch)
                sent += n
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(min(ahead, max(0.0, stop_at - time.monotonic())))
        except DeliveryFailed as exc:
            console.print(f"[bold red]stopped:[/] {exc}")
            sent += exc.result.accepted
    elapsed = max(time.monotonic() - started, 1e-9)
    console.print(f"loadgen: {sent} events in {elapsed:.1f}s = {sent / elapsed:,.0f} events/s "
                  f"({wallets} subjects, batches of {batch_size})")


def register(app: typer.Typer) -> None:
    events_app = typer.Typer(no_args_is_help=True, help="Usage events.")
    events_app.command("send")(send)
    app.add_typer(events_app, name="events")
    app.command("loadgen")(loadgen)
