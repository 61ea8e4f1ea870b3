"""`meterline up / status / down`: the embedded (or external) stack and its processes.

Start-up order, each step refusing loudly (StackError, non-zero exit) rather than stalling, one line per stage:
1. refuse if a supervisor is already running for this home;
2. check every port the stack will listen on before starting anything ("port 8080 is in use");
3. engines: external ones from the environment are checked, missing ones are started embedded (the broker
   with its topics on disk under <home>/broker unless METERLINE_BROKER_STORAGE=memory);
4. topics are created with explicit partition counts (on a durable broker they already exist after the first
   `up`, so no new topic life starts and the ledger's marks stay valid);
5. PostgreSQL migrations of every component run;
6. the Meterline processes start under the supervisor, which restarts any process or embedded engine that dies.
If any stage fails, everything started before it is stopped again.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ledger.schema_migrations import pending, upgrade
from meterline import services
from meterline.drain import DrainProbe, DrainProgress, wait_drained
from meterline.ports import PortInUse, check_ports, wanted_ports
from meterline.settings import StackSettings
from meterline.supervisor import ChildSpec, Engine, Supervisor, component_argv
from meterline.topics import ensure_topics, topic_specs

log = structlog.get_logger("meterline.stack")

#: Components that own PostgreSQL tables, in migration order (ledger first: others reference its ids).
MIGRATED_COMPONENTS = ("ledger", "streams", "api")

#: The processes `meterline up` supervises: name -> "module:function" run by `meterline run NAME`.
PROCESSES: dict[str, str] = {
    "api": "meterline.api_process:main",  # api/server.py with the hooks of meterline (reconcile_embedded.py)
    "streams": "streams.worker:main",
    "ledger": "ledger.consumer:main",
    "analytics": "analytics.sink:main",
    "scheduler": "meterline.scheduler:main",  # ledger/scheduler.py with the API's jobs added
}


#: the setting of each supervised process's probe port (/health, /ready, /metrics; ledger/probes.py). The api
#: serves them on its own port. `meterline up` gives every child a free port and records it in stack.json.
PROBE_PORT_SETTINGS: dict[str, str] = {
    "streams": "STREAMS_METRICS_PORT",
    "ledger": "LEDGER_METRICS_PORT",
    "analytics": "ANALYTICS_METRICS_PORT",
    "scheduler": "LEDGER_SCHEDULER_METRICS_PORT",
}


class StackError(RuntimeError):
    code = "stack.start_refused"


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def state(self) -> Path:
        return self.home / "stack.json"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def postgres(self) -> Path:
        return self.home / "postgres"

    @property
    def clickhouse(self) -> Path:
        return self.home / "clickhouse"

    @property
    def broker(self) -> Path:
        """The embedded broker's topics (disk storage)."""
        return self.home / "broker"


def migrations_location(component: str) -> Path:
    module = importlib.import_module(component)
    return Path(next(iter(module.__path__))) / "migrations"


def migrate(database_url: str) -> None:
    for component in MIGRATED_COMPONENTS:
        location = migrations_location(component)
        if location.exists():
            upgrade(database_url, script_location=location, version_table=f"alembic_version_{component}")


def pending_migrations(database_url: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for component in MIGRATED_COMPONENTS:
        location = migrations_location(component)
        if location.exists():
            todo = pending(database_url, script_location=location, version_table=f"alembic_version_{component}")
            if todo:
                out[component] = todo
    return out


def read_state(paths: Paths) -> dict[str, object] | None:
    try:
        return json.loads(paths.state.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def supervisor_alive(state: dict[str, object] | None) -> bool:
    if not state:
        return False
    pid = state.get("supervisor_pid")
    return isinstance(pid, int) and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


@dataclass
class RunningServices:
    urls: services.ServiceUrls
    broker: services.BrokerProcess | None
    embedded_postgres: Path | None

    def engines(self) -> list[tuple[str, Engine]]:
        """The embedded engines in start order, keyed as the state file names them."""
        out: list[tuple[str, Engine]] = []
        if self.embedded_postgres is not None:
            out.append(("postgres", services.EmbeddedPostgres(self.embedded_postgres)))
        if self.broker is not None:
            if self.broker.store is not None:
                out.append(("diskstore", self.broker.store))
            out.append(("broker", self.broker.broker))
        return out

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.embedded_postgres is not None:
            services.stop_embedded_postgres(self.embedded_postgres)


def start_services(settings: StackSettings, paths: Paths, *,
                   on_stage: Callable[[str], None] = lambda _: None) -> RunningServices:
    """Check external engines named in the environment; start embedded ones for the rest."""
    env = os.environ
    broker = None
    pg_dir = None
    durable = settings.broker_storage == "disk"
    try:
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            # the ports were checked; the disk store (a Python process) starts while PostgreSQL does
            broker = services.embedded_broker(
                host="127.0.0.1", port=settings.kafka_port, log_path=paths.logs / "broker.log",
                storage_dir=paths.broker if durable else None, store_port=settings.store_port if durable else None,
                retention_ms=settings.topic_retention_ms, merge_after_s=settings.broker_merge_after_s,
                merge_big_after_s=settings.broker_merge_big_after_s)
            if broker.store is not None:
                broker.store.spawn()
        if env.get("DATABASE_URL"):
            database_url = env["DATABASE_URL"]
            owner_url = env.get("DATABASE_OWNER_URL") or database_url
            services.check_database(owner_url)
            on_stage("PostgreSQL: reachable at DATABASE_OWNER_URL or DATABASE_URL")
        else:
            pg_dir = paths.postgres
            owner_url = services.start_embedded_postgres(pg_dir)
            on_stage(f"PostgreSQL: embedded, started ({pg_dir})")
            # the processes connect as the application role, which migrations create (ledger_0008)
            database_url = services.app_database_url(owner_url)
        if env.get("KAFKA_BOOTSTRAP_SERVERS"):
            bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
            services.check_broker(bootstrap)
            on_stage(f"Kafka: reachable at {bootstrap}")
        else:
            assert broker is not None
            services.start_embedded_broker_with(broker)
            bootstrap = broker.bootstrap
            on_stage(f"Kafka: embedded broker on {bootstrap}, topics "
                     + (f"on disk ({paths.broker}, retention {settings.topic_retention_ms // 3_600_000} h)"
                        if durable else "in memory (lost when the broker stops)"))
        clickhouse_url = env.get("CLICKHOUSE_URL") or services.embedded_clickhouse_url(paths.clickhouse)
    except BaseException:
        RunningServices(services.ServiceUrls("", "", ""), broker, pg_dir).stop()
        raise
    return RunningServices(services.ServiceUrls(database_url, bootstrap, clickhouse_url, owner_url), broker, pg_dir)


def prepare(settings: StackSettings, urls: services.ServiceUrls) -> list[str]:
    """Topics and migrations; returns the topics created."""
    created = ensure_topics(urls.kafka_bootstrap_servers, topic_specs(
        prefix=settings.topic_prefix, usage_partitions=settings.usage_partitions,
        charges_partitions=settings.charges_partitions, transactions_partitions=settings.transactions_partitions,
        retention_ms=settings.topic_retention_ms))
    migrate(urls.migrations_url)
    record_topic_lives(urls.migrations_url, created)
    return created


def record_topic_lives(database_url: str, created: list[str]) -> dict[str, int]:
    """Tell the ledger which topics were just created (after migrating, before any consumer starts): a topic
    it holds offset marks for starts a new life under a new identity (ledger/source_logs.py). Without this,
    the embedded broker's fresh, empty logs would look already applied after every restart."""
    if not created:
        return {}
    from ledger.db import make_engine
    from ledger.source_logs import record_created

    engine = make_engine(database_url, pool_size=1, application_name="meterline-stack")
    try:
        with engine.begin() as conn:
            epochs = record_created(conn, created)
    finally:
        engine.dispose()
    renewed = {topic: epoch for topic, epoch in epochs.items() if epoch > 0}
    if renewed:
        log.warning("topics recreated: their offsets start a new life; earlier marks and charges are kept",
                    topics=renewed)
    return epochs


def child_specs(settings: StackSettings) -> list[ChildSpec]:
    specs = []
    ports = _free_ports(settings.streams_workers + len(PROBE_PORT_SETTINGS) - 1)
    for name in PROCESSES:
        if name == "streams":
            for i in range(settings.streams_workers):
                specs.append(ChildSpec(f"streams-{i}", component_argv("streams"),
                                       {"STREAMS_WORKER_INDEX": str(i), PROBE_PORT_SETTINGS[name]: str(ports.pop())}))
        elif name in PROBE_PORT_SETTINGS:
            specs.append(ChildSpec(name, component_argv(name), {PROBE_PORT_SETTINGS[name]: str(ports.pop())}))
        else:
            specs.append(ChildSpec(name, component_argv(name)))
    return specs


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (each was bindable a moment ago)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(services.free_port())
    return sorted(ports)


def probe_urls(specs: list[ChildSpec], api_url: str) -> dict[str, str]:
    """Where `meterline status` finds each process's /health, /ready and /metrics."""
    urls = {"api": api_url}
    for spec in specs:
        port = next((spec.env[v] for v in PROBE_PORT_SETTINGS.values() if v in spec.env), None)
        if port is not None:
            urls[spec.name] = f"http://127.0.0.1:{port}"
    return urls


def up(settings: StackSettings, *, should_stop: Callable[[], bool],
       on_ready: Callable[[Supervisor], None] | None = None,
       on_stage: Callable[[str], None] = lambda _: None) -> None:
    paths = Paths(settings.home.resolve())
    paths.home.mkdir(parents=True, exist_ok=True)
    if supervisor_alive(read_state(paths)):
        raise StackError(f"a Meterline stack is already running for {paths.home}; run `meterline down` first")
    try:
        check_ports(settings)
    except PortInUse as exc:
        raise StackError(str(exc)) from None
    on_stage("ports: " + ", ".join(str(port) for _, _, port in wanted_ports(settings)) + " free")
    started = time.monotonic()
    running = start_services(settings, paths, on_stage=on_stage)
    supervisor = None
    try:
        created = prepare(settings, running.urls)
        on_stage(f"topics: {len(created)} created" if created else "topics: all present (kept from the last run)")
        on_stage("migrations: applied")
        base_env = {**os.environ, **running.urls.as_env(),
                    "METERLINE_HOME": str(paths.home), "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
                    "API_PORT": str(settings.api_port), "API_HOST": settings.api_host,
                    # the embedded broker can acknowledge an idempotent retry it never stored (ledger/kafka.py)
                    **({"KAFKA_PRODUCER_IDEMPOTENCE": "false"} if running.broker is not None else {})}
        specs = child_specs(settings)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        supervisor = Supervisor(
            specs, base_env=base_env, log_dir=paths.logs, state_path=paths.state,
            extra_state={"urls": running.urls.to_dict(), "home": str(paths.home),
                         "api_url": api_url, "probes": probe_urls(specs, api_url),
                         "broker_pid": running.broker.process.pid if running.broker else None,
                         "broker_storage": settings.broker_storage if running.broker else "external",
                         "broker_data": str(paths.broker) if running.broker and running.broker.store else None,
                         "embedded_postgres": str(running.embedded_postgres) if running.embedded_postgres else None},
            backoff_s_max=settings.restart_backoff_s_max, engines=running.engines(),
        )
        supervisor.start_all()
        on_stage(f"processes: {', '.join(c.spec.name for c in supervisor.children)} started")
        log.info("stack started", seconds=round(time.monotonic() - started, 1), home=str(paths.home))
        with contextlib.suppress(ValueError):  # only the main thread may set handlers (tests call up() directly)
            signal.signal(signal.SIGUSR1, lambda *_: supervisor.request_pause("api") if supervisor else None)
        if on_ready is not None:
            on_ready(supervisor)
        supervisor.run_forever(should_stop=should_stop)
    finally:
        if supervisor is not None:
            supervisor.stop()
        running.stop()
        with contextlib.suppress(FileNotFoundError):
            paths.state.unlink()
        log.info("stack stopped")


def api_health(api_url: str, *, timeout_s: float = 2.0) -> dict[str, object] | None:
    try:
        response = httpx.get(f"{api_url}/healthz", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    health: dict[str, object] = response.json()
    return health


def status(settings: StackSettings, *, deep: bool = False) -> dict[str, object]:
    """The supervisor's process table and the API's health; with ``deep`` also engines, every process's probes,
    consumer lag, dead letters, the invariant check and the verdict ``healthy`` (meterline/health.py)."""
    paths = Paths(settings.home.resolve())
    state = read_state(paths)
    if not supervisor_alive(state):
        return {"running": False, "home": str(paths.home)}
    assert state is not None
    children = state.get("children", {})
    assert isinstance(children, dict)
    report = {name: {**info, "alive": _running(info.get("pid"))} for name, info in children.items()}
    out: dict[str, object] = {"running": True, "home": str(paths.home), "api_url": state.get("api_url"),
                              "urls": state.get("urls"), "children": report, "engines": engines_status(state),
                              "broker_storage": state.get("broker_storage"),
                              "api_health": api_health(str(state.get("api_url")))}
    if deep:
        from meterline import health

        urls, probes = state.get("urls"), state.get("probes")
        out.update(health.collect(urls=urls if isinstance(urls, dict) else {},
                                  probe_urls=probes if isinstance(probes, dict) else {}, children=report))
    return out


def _running(pid: object) -> bool:
    """A live process (a killed child its supervisor has not reaped yet is a zombie: not running)."""
    if not isinstance(pid, int) or not pid:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def engines_status(state: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """The embedded engines as the supervisor last wrote them (pid, restarts, last exit code), with "alive" read
    now from the pid: for `meterline status`. External engines are not listed (their URLs are in "urls")."""
    engines = state.get("engines", {})
    if not isinstance(engines, dict):
        return {}
    out = {}
    for key, info in engines.items():
        pid = info.get("pid")
        alive = isinstance(pid, int) and psutil.pid_exists(pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            alive = alive and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        out[key] = {**info, "alive": alive}
    return out


def down(settings: StackSettings, *, timeout_s: float = 40.0, drain: bool = True,
         drain_timeout_s: float | None = None, console: Console | None = None) -> bool:
    """Stop a running stack. Returns False when none was running. With ``drain`` it first stops ingest (the
    supervisor pauses the API) and waits until every accepted event is applied and the outbox relayed."""
    paths = Paths(settings.home.resolve())
    state = read_state(paths)
    if not supervisor_alive(state):
        _clean_leftovers(paths, state)
        return False
    assert state is not None
    pid = state["supervisor_pid"]
    assert isinstance(pid, int), "the state file's supervisor_pid is not a number"
    if drain:
        drain_stack(settings, paths, state, timeout_s=settings.drain_timeout_s if drain_timeout_s is None
                    else drain_timeout_s, console=console or Console(stderr=True))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        time.sleep(0.1)
    if psutil.pid_exists(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _clean_leftovers(paths, state)
    return True


def drain_stack(settings: StackSettings, paths: Paths, state: dict[str, object], *, timeout_s: float,
                console: Console) -> DrainProgress | None:
    """Stop ingest, then wait with a progress bar until the ledger has applied every accepted event and relayed
    its outbox (or the time is up: what remains stays in the durable topic and is applied after the next `up`)."""
    from ledger.kafka import topic_name
    from streams.contracts import TOPIC_USAGE_EVENTS

    pid = state["supervisor_pid"]
    assert isinstance(pid, int)
    started = time.monotonic()  # "drained in" counts from here: stopping ingest is part of the drain
    os.kill(pid, signal.SIGUSR1)  # the supervisor pauses the API: no new 2xx from here on
    _wait_until(lambda: _api_stopped(paths), timeout_s=15)
    urls = state.get("urls")
    assert isinstance(urls, dict)
    broker_data = state.get("broker_data")
    probe = DrainProbe(database_url=str(urls["database_url"]), bootstrap=str(urls["kafka_bootstrap_servers"]),
                       topic=topic_name(TOPIC_USAGE_EVENTS, settings.topic_prefix),
                       broker_data=Path(broker_data) if isinstance(broker_data, str) else None,
                       ends_exact=state.get("broker_storage") != "memory")
    try:
        with Progress(TextColumn("draining"), BarColumn(), TextColumn("{task.fields[left]}"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task("drain", total=None, left="")
            first: list[int] = []

            def show(progress: DrainProgress) -> None:
                if not first:
                    first.append(max(progress.remaining, 1))
                total = max(first[0], progress.remaining)
                bar.update(task, total=total, completed=total - progress.remaining,
                           left=f"{progress.events_behind:,} events, {progress.outbox_backlog:,} outbox rows left")

            try:
                last = wait_drained(probe, timeout_s=timeout_s, on_progress=show)
            except KeyboardInterrupt:  # Ctrl-C during the wait: stop now, as `--now` would
                console.print("[yellow]drain interrupted[/]: stopping now; what is left stays in the topic")
                return None
    finally:
        probe.close()
    seconds = time.monotonic() - started
    if last.done:
        console.print(f"drained in {seconds:.1f} s" + ("" if last.ends_known else
                      " (memory broker: its log ends are approximate, see docs/architecture.md)"))
    else:
        console.print(f"[yellow]drain timed out after {seconds:.0f} s[/]: {last.events_behind:,} accepted events "
                      f"and {last.outbox_backlog:,} outbox rows not applied yet. They stay in the topic and are "
                      "applied after the next `meterline up`.")
    log.debug("drain finished", seconds=round(seconds, 2), events_behind=last.events_behind,
             outbox_backlog=last.outbox_backlog)
    return last


def _api_stopped(paths: Paths) -> bool:
    state = read_state(paths) or {}
    children = state.get("children", {})
    api = children.get("api", {}) if isinstance(children, dict) else {}
    return bool(api.get("paused")) and not api.get("pid")


def _wait_until(predicate: Callable[[], bool], *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _clean_leftovers(paths: Paths, state: dict[str, object] | None) -> None:
    """After a supervisor was killed hard: end its children, broker and embedded PostgreSQL."""
    if state:
        children = state.get("children", {})
        pids = [info.get("pid") for info in children.values()] if isinstance(children, dict) else []
        pids.append(state.get("broker_pid"))
        engines = state.get("engines", {})
        if isinstance(engines, dict):  # PostgreSQL is stopped below with pg_ctl (it is not in our group)
            pids += [info.get("pid") for key, info in engines.items() if key != "postgres"]
        for pid in pids:
            if isinstance(pid, int) and psutil.pid_exists(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
    services.stop_embedded_postgres(paths.postgres)
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
