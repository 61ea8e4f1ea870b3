"""The `meterline` command line. Each command is a thin shell over a component or the stack module."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from meterline.logs import configure_logging
from meterline.settings import get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Meterline: usage metering and prepaid credits on Kafka, PostgreSQL and ClickHouse.")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
app.add_typer(topics_app, name="topics")
console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def up(detach: Annotated[bool, typer.Option("--detach", "-d", help="start in the background and return when healthy")] = False,
       timeout_s: Annotated[float, typer.Option(help="how long --detach waits for health")] = 60.0) -> None:
    """Start the engines (embedded unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS / CLICKHOUSE_URL are set),
    create topics, run migrations and supervise every Meterline process. Ctrl-C stops everything."""
    from meterline import stack

    settings = get_settings()
    if detach:
        _up_detached(settings, timeout_s)
        return
    configure_logging(component="supervisor")
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        stack.up(settings, should_stop=lambda: stop_requested)
    except Exception as exc:
        if getattr(exc, "code", None) or isinstance(exc, RuntimeError):
            _fail(str(exc))
        raise


def _up_detached(settings: object, timeout_s: float) -> None:
    from meterline import stack

    home = get_settings().home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    log_path = home / "logs" / "supervisor.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "meterline", "up"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            _fail("the stack did not start:\n" + "\n".join(tail))
        report = stack.status(get_settings())
        health = report.get("api_health")
        if report.get("running") and isinstance(health, dict) and health.get("status") == "ok":
            console.print(f"[green]Meterline is up[/] at {report['api_url']} (data in {home}); "
                          "`meterline status` to inspect, `meterline down` to stop.")
            return
        time.sleep(0.5)
    _fail(f"the stack did not become healthy within {timeout_s:.0f}s; see {home / 'logs'}")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show each component's health."""
    from meterline import stack

    report = stack.status(get_settings())
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        raise typer.Exit(0 if report["running"] else 3)
    if not report["running"]:
        console.print(f"Meterline is not running (home {report['home']}).")
        raise typer.Exit(3)
    table = Table(title=f"Meterline at {report['api_url']}")
    for column in ("process", "pid", "alive", "restarts", "last exit"):
        table.add_column(column)
    children = report["children"]
    assert isinstance(children, dict)
    for name, info in children.items():
        table.add_row(name, str(info["pid"]), "[green]yes[/]" if info["alive"] else "[red]no[/]",
                      str(info["restarts"]), str(info["last_exit_code"]))
    Console().print(table)
    health = report.get("api_health")
    Console().print(f"api health: {json.dumps(health) if health else '[red]not answering[/]'}")


@app.command()
def down() -> None:
    """Stop a running stack and everything it started."""
    from meterline import stack

    if stack.down(get_settings()):
        console.print("Meterline stopped.")
    else:
        console.print("Meterline was not running.")


@app.command()
def run(component: Annotated[str, typer.Argument(help="api | streams | ledger | analytics | scheduler")]) -> None:
    """Run one Meterline process in the foreground (what `up` supervises)."""
    from meterline.stack import PROCESSES

    if component not in PROCESSES:
        _fail(f"unknown component {component!r}; choose one of {', '.join(PROCESSES)}", code=2)
    configure_logging(component=component if component != "streams" else
                      f"streams-{os.environ.get('STREAMS_WORKER_INDEX', '0')}")
    module_name, function_name = PROCESSES[component].split(":")
    getattr(importlib.import_module(module_name), function_name)()


@app.command()
def migrate() -> None:
    """Run every component's PostgreSQL migrations against DATABASE_URL."""
    from meterline.stack import migrate as run_migrations

    url = os.environ.get("DATABASE_URL")
    if not url:
        _fail("DATABASE_URL is not set (`meterline up` migrates the embedded database itself)", code=2)
    run_migrations(url)
    console.print("migrations applied")


@topics_app.command("create")
def topics_create(then_migrate: Annotated[bool, typer.Option("--then-migrate", help="also run migrations")] = False) -> None:
    """Create Meterline's topics on KAFKA_BOOTSTRAP_SERVERS with the configured partition counts."""
    from meterline.topics import ensure_topics, topic_specs

    settings = get_settings()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        _fail("KAFKA_BOOTSTRAP_SERVERS is not set", code=2)
    created = ensure_topics(bootstrap, topic_specs(
        prefix=settings.topic_prefix, usage_partitions=settings.usage_partitions,
        charges_partitions=settings.charges_partitions, transactions_partitions=settings.transactions_partitions))
    console.print(f"created: {', '.join(created) or 'nothing (all present)'}")
    if then_migrate:
        from meterline.stack import record_topic_lives

        migrate()
        record_topic_lives(os.environ.get("DATABASE_URL", ""), created)
    elif created:
        console.print("[yellow]note:[/] run `meterline topics create --then-migrate` (with DATABASE_URL) when "
                      "topics may have existed before: the ledger must learn they were recreated")


def _register_optional_commands() -> None:
    """Command groups owned by other modules register themselves here (one module per group)."""
    for module_name in ("meterline.cli_demo", "meterline.cli_events", "meterline.cli_catalog",
                        "meterline.cli_reconcile", "meterline.cli_replay", "meterline.cli_ledger",
                        "meterline.cli_export", "meterline.cli_entitlements"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)


_register_optional_commands()


def main() -> None:
    app()
