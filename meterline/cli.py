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


STAGE_MARK = "• "  # `up` prints one line per stage with it; `up --detach` echoes those lines from the log


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
    stage_console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        stack.up(settings, should_stop=lambda: stop_requested,
                 on_stage=lambda line: stage_console.print(STAGE_MARK + line, markup=False))
    except Exception as exc:
        if getattr(exc, "code", None) or isinstance(exc, RuntimeError):
            _fail(str(exc))
        raise


def _up_detached(settings: object, timeout_s: float) -> None:
    """Start `meterline up` in the background, echo its stage lines, return when the API is healthy. On any
    failure (the supervisor exits, a process dies during start-up, the timeout) it names the cause and stops
    whatever was started."""

    from meterline.ports import PortInUse, check_ports

    try:  # before spawning anything: a busy port is the commonest failure and the cheapest to name
        check_ports(get_settings())
    except PortInUse as exc:
        _fail(str(exc))
    home = get_settings().home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    log_path = home / "logs" / "supervisor.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "meterline", "up"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s

    def new_lines() -> list[str]:
        nonlocal offset
        with log_path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        offset += len(complete)
        return complete.decode(errors="replace").splitlines()

    from meterline import stack

    def give_up(message: str) -> NoReturn:
        stack.down(get_settings(), drain=False)
        if proc.poll() is None:
            proc.kill()
        _fail(message)

    seen: list[str] = []
    while time.monotonic() < deadline:
        for line in new_lines():
            seen.append(line)
            if line.startswith(STAGE_MARK):
                console.print(line, markup=False, highlight=False)
        if proc.poll() is not None:
            seen += new_lines()
            errors = [line.split("error:", 1)[1].strip() for line in seen if "error:" in line]
            _fail(errors[-1] if errors else "the stack did not start:\n" + "\n".join(seen[-15:]))
        report = stack.status(get_settings())
        children = report.get("children")
        if isinstance(children, dict):
            for name, info in children.items():
                if info.get("restarts", 0) > 0:
                    give_up(f"{name} exited with code {info.get('last_exit_code')} during start-up; last lines of "
                            f"{home / 'logs' / (name + '.log')}:\n" + _tail(home / "logs" / f"{name}.log"))
        health = report.get("api_health")
        if report.get("running") and isinstance(health, dict) and health.get("status") == "ok":
            console.print(f"[green]Meterline is up[/] at {report['api_url']} (data in {home}); "
                          "`meterline status` to inspect, `meterline down` to stop.")
            return
        time.sleep(0.25)
    give_up(f"the stack did not become healthy within {timeout_s:.0f}s; see {home / 'logs'}")


def _tail(path: object, lines: int = 10) -> str:
    from pathlib import Path

    try:
        return "\n".join(Path(str(path)).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Engines, every process (pid, restarts, /health, /ready, metrics URL), consumer lag per group, dead letters
    and the invariant check. Exit 0 when all is healthy, 1 when something is not, 3 when no stack runs."""
    from meterline import stack

    report = stack.status(get_settings(), deep=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        raise typer.Exit(0 if report.get("healthy") else 1 if report["running"] else 3)
    if not report["running"]:
        console.print(f"Meterline is not running (home {report['home']}).")
        raise typer.Exit(3)
    _print_status(report)
    raise typer.Exit(0 if report["healthy"] else 1)


def _yes_no(value: object) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"


def _print_status(report: dict[str, object]) -> None:
    out = Console()
    engines = report["engines"]
    assert isinstance(engines, dict)
    table = Table(title="engines")
    for column in ("engine", "reachable", "detail"):
        table.add_column(column)
    for name, engine in engines.items():
        table.add_row(name, _yes_no(engine["reachable"]), str(engine["detail"]))
    out.print(table)
    table = Table(title=f"Meterline at {report['api_url']}")
    for column in ("process", "pid", "alive", "restarts", "last exit", "health", "ready", "metrics"):
        table.add_column(column)
    children, probes = report["children"], report["probes"]
    assert isinstance(children, dict) and isinstance(probes, dict)
    for name, info in children.items():
        probe = probes.get(name, {})
        table.add_row(name, str(info["pid"]), _yes_no(info["alive"]), str(info["restarts"]),
                      str(info["last_exit_code"]), _yes_no(probe.get("health")), _yes_no(probe.get("ready")),
                      f"{probe['url']}/metrics" if probe.get("url") else "-")
    out.print(table)
    lag = report["consumer_lag"]
    assert isinstance(lag, dict)
    out.print("consumer lag: " + (", ".join(f"{group} {g['messages']}" for group, g in sorted(lag.items()))
                                  or "no partitions reported"))
    dead = report["dead_letters"]
    assert isinstance(dead, dict)
    out.print(f"dead letters: {dead['total']} {dead['by_reason'] or ''} ({dead['note']})")
    metered = report.get("events") or {}
    assert isinstance(metered, dict)
    outcomes = metered.get("outcomes") or {}
    out.print("events: " + (", ".join(f"{name} {n}" for name, n in sorted(outcomes.items())) or "none metered yet")
              + (f"; {', '.join(f'{name} {n}' for name, n in sorted((metered.get('notes') or {}).items()))}"
                 if metered.get("notes") else "") + f" ({metered.get('note', '')})")
    for notice in metered.get("notices") or []:
        out.print(f"  [yellow]notice:[/] {notice}")
    invariants = report["invariant_check"]
    assert isinstance(invariants, dict)
    out.print(f"invariant check: {invariants['state']} {invariants.get('violations') or ''}")
    reconciled = report.get("reconciliation") or {}
    assert isinstance(reconciled, dict)
    drifted = {r: n for r, n in (reconciled.get("disagreeing_wallets") or {}).items() if n}
    out.print(f"reconciliation: {reconciled.get('state', 'unknown')} "
              f"{'disagreeing wallets per record ' + str(drifted) if drifted else ''}")
    problems = report["problems"]
    assert isinstance(problems, list)
    if problems:
        out.print("[bold red]unhealthy:[/]")
        for problem in problems:
            out.print(f"  - {problem}")
    else:
        out.print("[green]healthy[/]")


@app.command()
def down(now: Annotated[bool, typer.Option("--now", help="stop at once, without waiting for accepted events")] = False,
         drain_timeout_s: Annotated[float | None, typer.Option(
             help="how long to wait for accepted events to be applied (default METERLINE_DRAIN_TIMEOUT_S)")] = None,
         ) -> None:
    """Stop a running stack and everything it started. By default it first stops ingest and waits (with a
    progress bar) until every accepted event is applied to the ledger and the outbox is relayed."""
    from meterline import stack

    settings = get_settings()
    timeout = settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
    if stack.down(settings, drain=not now, drain_timeout_s=timeout, console=console):
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
    """Run every component's PostgreSQL migrations as DATABASE_OWNER_URL (else DATABASE_URL)."""
    from meterline.stack import migrate as run_migrations

    url = os.environ.get("DATABASE_OWNER_URL") or os.environ.get("DATABASE_URL")
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
                        "meterline.cli_export", "meterline.cli_entitlements", "meterline.cli_payments"):
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
