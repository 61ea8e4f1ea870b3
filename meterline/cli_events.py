"""`meterline events send FILE|-` and `meterline loadgen`: the SDK from the command line.

The API key comes from ``--api-key`` or ``METERLINE_API_KEY``; the URL from ``--url``, ``METERLINE_API_URL``
or the local stack's address. loadgen is bounded in count AND time and only targets 127.0.0.1 (it exists
to exercise a local stack, never someone else's server)."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any
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
            event_type: Annotated[str, typer.Option("--type", help="event type; a meter must count it")
                                  ] = "llm.tokens",
            create_meter: Annotated[bool, typer.Option(
                help="with an admin key, create a SUM-of-$.tokens meter and a price when no meter counts --type")
            ] = True,
            unit_price_minor: Annotated[str, typer.Option(help="price per token of a meter loadgen creates")
                                        ] = "0.01",
            settle_s: Annotated[float, typer.Option(min=0, max=600, help="how long to wait for the pipeline")
                                ] = 60.0) -> None:
    """Send synthetic usage events to a LOCAL stack, bounded in count and time, then report from the
    pipeline how many were accepted, dead-lettered and charged. Exit 1 when nothing was charged."""
    from meterline import loadgen as lg
    from meterline.client import DeliveryFailed, MeterlineClient, usage_event

    key = _require_key(api_key)
    base = _base_url(url)
    host = urlparse(base).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[bold red]error:[/] loadgen only targets 127.0.0.1 (got {host})")
        raise typer.Exit(2)
    meter, project = _loadgen_meter(base, key, event_type, create=create_meter, unit_price_minor=unit_price_minor)
    engines = _loadgen_engines()
    run = uuid.uuid4().hex[:8]
    source = f"loadgen-{run}"
    subjects = [f"loadgen-{i}" for i in range(wallets)]
    wallet_ids = lg.auto_wallets(project, subjects)

    def counts() -> lg.PipelineCounts:
        return lg.ledger_counts(engines[0], project=project, meter_id=meter["id"], wallets=wallet_ids)

    baseline = counts()
    letters = lg.DeadLetterCounter(engines[1], engines[2], source=source, since_ms=int(time.time() * 1000) - 1000)
    sent = accepted = 0
    started = time.monotonic()
    stop_at = started + duration
    try:
        with MeterlineClient(base, key, batch_size=batch_size) as client:
            try:
                while sent < max_events and time.monotonic() < stop_at:
                    n = min(batch_size, max_events - sent)
                    batch = [usage_event(type=event_type, subject=subjects[(sent + i) % wallets], source=source,
                                         data=lg.event_data(meter, 1 + (sent + i) % 100)) for i in range(n)]
                    result = client.send(batch)
                    sent += n
                    accepted += result.accepted
                    ahead = started + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(min(ahead, max(0.0, stop_at - time.monotonic())))
            except DeliveryFailed as exc:
                console.print(f"[bold red]stopped:[/] {exc}")
                accepted += exc.result.accepted
        elapsed = max(time.monotonic() - started, 1e-9)
        console.print(f"loadgen: sent {sent} events of {event_type} (meter {meter['slug']}) in {elapsed:.1f}s = "
                      f"{sent / elapsed:,.0f} events/s ({wallets} subjects, batches of {batch_size}, "
                      f"source {source}); waiting up to {settle_s:.0f}s for the pipeline")
        report = lg.settle(lg.LoadgenReport(sent=sent, accepted=accepted), counts=counts, baseline=baseline,
                           letters=letters, settle_s=settle_s)
    finally:
        letters.close()
    table = Table(title="loadgen (from the pipeline)")
    for column in ("sent", "accepted", "dead-lettered", "charged events", "charged credits (minor)", "unaccounted"):
        table.add_column(column, justify="right")
    table.add_row(str(report.sent), str(report.accepted), str(report.dead_lettered), str(report.charged_events),
                  str(report.charged_minor), str(max(report.unaccounted, 0)))
    Console().print(table)
    for reason, n in sorted((report.reasons or {}).items(), key=lambda kv: -kv[1]):
        console.print(f"  dead-lettered [yellow]{reason}[/]: {n}")
    if not report.settled:
        console.print(f"[yellow]not settled after {settle_s:.0f}s:[/] {report.unaccounted} accepted events are "
                      "neither charged nor dead-lettered yet (a meter filter, an unpriced meter, or a busy pipeline)")
    code = lg.exit_code(report)
    if code:
        console.print("[bold red]nothing was charged[/] (see the dead-letter reasons above, and the meter's price)")
    raise typer.Exit(code)


def _loadgen_meter(base: str, key: str, event_type: str, *, create: bool,
                   unit_price_minor: str) -> tuple[dict[str, Any], str]:
    """The key's project and the meter that counts ``event_type`` (created when allowed and missing)."""
    import httpx

    from meterline import loadgen as lg

    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        try:
            who = lg.key_project(http)
            project = str(who["project_id"])
            if "read" not in who["scopes"] and "admin" not in who["scopes"]:
                console.print("[bold red]error:[/] loadgen reads the project's meters: use a key with the read "
                              "(or admin) scope besides ingest")
                raise typer.Exit(2)
            choice = lg.choose_meter(lg.list_meters(http, project), event_type)
            if choice.meter is not None:
                lg.event_data(choice.meter, 1)  # fails early on a path loadgen cannot shape
                return choice.meter, project
            if not create or "admin" not in who["scopes"]:
                known = ", ".join(choice.others) or "none"
                console.print(f"[bold red]error:[/] no meter of project {project} counts events of type "
                              f"{event_type!r} (its meters: {known}). Pass --type of one of them, create one "
                              "(POST /api/v1/projects/{project}/meters, or `meterline meters create`), or run "
                              "loadgen with an admin-scoped key to let it create one.")
                raise typer.Exit(2)
            meter = lg.create_meter(http, project, event_type, unit_price_minor=unit_price_minor)
            console.print(f"loadgen: created meter {meter['slug']} (SUM of $.tokens for {event_type}) priced "
                          f"{unit_price_minor} credits (minor) per token")
            return meter, project
        except httpx.HTTPStatusError as exc:
            console.print(f"[bold red]error:[/] {exc.request.method} {exc.request.url.path}: "
                          f"{exc.response.status_code} {exc.response.text[:300]}")
            raise typer.Exit(2) from None
        except ValueError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None


def _loadgen_engines() -> tuple[str, str, str]:
    """(database URL, Kafka bootstrap, DLQ topic) of the local stack loadgen reads its report from."""
    from ledger.kafka import topic_name
    from meterline.urls import EngineUrlMissing, engine_url
    from streams.contracts import TOPIC_USAGE_DLQ
    from streams.settings import get_settings as streams_settings

    try:
        database_url, bootstrap = engine_url("database_url"), engine_url("kafka_bootstrap_servers")
    except EngineUrlMissing as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    return database_url, bootstrap, topic_name(TOPIC_USAGE_DLQ, streams_settings().topic_prefix)


def register(app: typer.Typer) -> None:
    events_app = typer.Typer(no_args_is_help=True, help="Usage events.")
    events_app.command("send")(send)
    app.add_typer(events_app, name="events")
    app.command("loadgen")(loadgen)
