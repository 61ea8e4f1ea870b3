"""`meterline up / status / down`: the embedded (or external) stack and its processes.

Start-up order, each step refusing loudly (StackError, non-zero exit) rather than stalling:
1. refuse if a supervisor is already running for this home;
2. engines: external ones from the environment are checked, missing ones are started embedded;
3. topics are created with explicit partition counts;
4. PostgreSQL migrations of every component run;
5. the Meterline processes start under the supervisor, which restarts any that dies.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import structlog

from ledger.schema_migrations import pending, upgrade
from meterline import services
from meterline.settings import StackSettings
from meterline.supervisor import ChildSpec, Supervisor, component_argv
from meterline.topics import ensure_topics, topic_specs

log = structlog.get_logger("meterline.stack")

#: Components that own PostgreSQL tables, in migration order (ledger first: others reference its ids).
MIGRATED_COMPONENTS = ("ledger", "streams", "api")

#: The processes `meterline up` supervises: name -> "module:function" run by `meterline run NAME`.
PROCESSES: dict[str, str] = {
    "api": "api.server:main",
    "streams": "streams.worker:main",
    "ledger": "ledger.consumer:main",
    "analytics": "analytics.sink:main",
    "scheduler": "meterline.scheduler:main",  # ledger/scheduler.py with the API's jobs added
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

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.embedded_postgres is not None:
            services.stop_embedded_postgres(self.embedded_postgres)


def start_services(settings: StackSettings, paths: Paths) -> RunningServices:
    """Check external engines named in the environment; start embedded ones for the rest."""
    env = os.environ
    broker = None
    pg_dir = None
    try:
        if env.get("DATABASE_URL"):
            database_url = env["DATABASE_URL"]
            owner_url = env.get("DATABASE_OWNER_URL") or database_url
            services.check_database(owner_url)
        else:
            pg_dir = paths.postgres
            owner_url = services.start_embedded_postgres(pg_dir)
            # the processes connect as the application role, which migrations create (ledger_0008)
            database_url = services.app_database_url(owner_url)
        if env.get("KAFKA_BOOTSTRAP_SERVERS"):
            bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
            services.check_broker(bootstrap)
        else:
            broker = services.start_embedded_broker(host="127.0.0.1", port=settings.kafka_port,
                                                    log_path=paths.logs / "broker.log")
            bootstrap = broker.bootstrap
        clickhouse_url = env.get("CLICKHOUSE_URL") or services.embedded_clickhouse_url(paths.clickhouse)
    except BaseException:
        RunningServices(services.ServiceUrls("", "", ""), broker, pg_dir).stop()
        raise
    return RunningServices(services.ServiceUrls(database_url, bootstrap, clickhouse_url, owner_url), broker, pg_dir)


def prepare(settings: StackSettings, urls: services.ServiceUrls) -> list[str]:
    """Topics and migrations; returns the topics created."""
    created = ensure_topics(urls.kafka_bootstrap_servers, topic_specs(
        prefix=settings.topic_prefix, usage_partitions=settings.usage_partitions,
        charges_partitions=settings.charges_partitions, transactions_partitions=settings.transactions_partitions))
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
    for name in PROCESSES:
        if name == "streams":
            for i in range(settings.streams_workers):
                specs.append(ChildSpec(f"streams-{i}", component_argv("streams"),
                                       {"STREAMS_WORKER_INDEX": str(i)}))
        else:
            specs.append(ChildSpec(name, component_argv(name)))
    return specs


def up(settings: StackSettings, *, should_stop: callable, on_ready: callable | None = None) -> None:  # type: ignore[valid-type]
    paths = Paths(settings.home.resolve())
    paths.home.mkdir(parents=True, exist_ok=True)
    if supervisor_alive(read_state(paths)):
        raise StackError(f"a Meterline stack is already running for {paths.home}; run `meterline down` first")
    started = time.monotonic()
    running = start_services(settings, paths)
    supervisor = None
    try:
        prepare(settings, running.urls)
        base_env = {**os.environ, **running.urls.as_env(),
                    "METERLINE_HOME": str(paths.home), "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
                    "API_PORT": str(settings.api_port), "API_HOST": settings.api_host}
        supervisor = Supervisor(
            child_specs(settings), base_env=base_env, log_dir=paths.logs, state_path=paths.state,
            extra_state={"urls": running.urls.to_dict(), "home": str(paths.home),
                         "api_url": f"http://{settings.api_host}:{settings.api_port}",
                         "broker_pid": running.broker.process.pid if running.broker else None,
                         "embedded_postgres": str(running.embedded_postgres) if running.embedded_postgres else None},
            backoff_s_max=settings.restart_backoff_s_max,
        )
        supervisor.start_all()
        log.info("stack started", seconds=round(time.monotonic() - started, 1), home=str(paths.home))
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


def status(settings: StackSettings) -> dict[str, object]:
    paths = Paths(settings.home.resolve())
    state = read_state(paths)
    if not supervisor_alive(state):
        return {"running": False, "home": str(paths.home)}
    assert state is not None
    children = state.get("children", {})
    assert isinstance(children, dict)
    report = {name: {**info, "alive": bool(info.get("pid")) and psutil.pid_exists(info["pid"])}
              for name, info in children.items()}
    return {"running": True, "home": str(paths.home), "api_url": state.get("api_url"),
            "urls": state.get("urls"), "children": report,
            "api_health": api_health(str(state.get("api_url")))}


def down(settings: StackSettings, *, timeout_s: float = 40.0) -> bool:
    """Stop a running stack. Returns False when none was running."""
    paths = Paths(settings.home.resolve())
    state = read_state(paths)
    if not supervisor_alive(state):
        _clean_leftovers(paths, state)
        return False
    assert state is not None
    pid = state["supervisor_pid"]
    assert isinstance(pid, int), "the state file's supervisor_pid is not a number"
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


def _clean_leftovers(paths: Paths, state: dict[str, object] | None) -> None:
    """After a supervisor was killed hard: end its children, broker and embedded PostgreSQL."""
    if state:
        children = state.get("children", {})
        pids = [info.get("pid") for info in children.values()] if isinstance(children, dict) else []
        pids.append(state.get("broker_pid"))
        for pid in pids:
            if isinstance(pid, int) and psutil.pid_exists(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
    services.stop_embedded_postgres(paths.postgres)
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
