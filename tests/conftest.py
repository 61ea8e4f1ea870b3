"""Session-wide real engines for the whole suite: a Kafka-API broker, PostgreSQL and ClickHouse.

Where each comes from, in order:
1. a URL in the environment (``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``, ``CLICKHOUSE_URL``), so the same
   suite runs against the compose stack;
2. testcontainers, when a Docker engine answers;
3. the embedded engines (DESIGN §4), started once per session under a temporary directory.

Isolation: every test that touches PostgreSQL gets its own database cloned from a migrated template
(``database_url``), and every test that touches Kafka gets its own topic prefix (``topics``), so no two
tests share state and nothing has to be cleaned between them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from ledger.db import libpq_url

#: The migrated database every test clones, one per session: on a shared external server (DATABASE_URL, e.g. CI's
#: PostgreSQL on 127.0.0.1:5432) two sessions at once must not drop each other's template.
TEMPLATE_DB = f"meterline_template_{os.getpid()}"


@dataclass(frozen=True)
class Engines:
    admin_database_url: str  # a database we may CREATE DATABASE from
    kafka_bootstrap_servers: str
    clickhouse_url: str


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _containers() -> Iterator[dict[str, str]]:  # pragma: no cover - needs a Docker engine
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:17", driver="psycopg") as pg, KafkaContainer().with_kraft() as kafka, \
            ClickHouseContainer() as ch:
        yield {
            "DATABASE_URL": pg.get_connection_url(),
            "KAFKA_BOOTSTRAP_SERVERS": kafka.get_bootstrap_server(),
            "CLICKHOUSE_URL": f"http://{ch.username}:{ch.password}@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}",
        }


@pytest.fixture(scope="session")
def engines() -> Iterator[Engines]:
    from meterline import services

    wanted = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")
    from_env = {k: os.environ[k] for k in wanted if os.environ.get(k)}
    with contextlib.ExitStack() as stack:
        if len(from_env) < len(wanted) and os.environ.get("METERLINE_TEST_CONTAINERS", "auto") != "off" \
                and _docker_answers():
            from_env = {**stack.enter_context(_containers()), **from_env}
        # Not under pytest's basetemp: pytest prunes old basetemps, which deleted a concurrent session's live
        # PostgreSQL. A private directory per session, removed when the engines have stopped.
        root = Path(os.environ.get("METERLINE_TEST_HOME") or tempfile.mkdtemp(prefix="meterline-engines-"))
        if not os.environ.get("METERLINE_TEST_HOME"):
            stack.callback(shutil.rmtree, root, True)
        database_url = from_env.get("DATABASE_URL")
        if not database_url:
            database_url = services.start_embedded_postgres(root / "postgres")
            stack.callback(services.stop_embedded_postgres, root / "postgres")
        bootstrap = from_env.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = services.start_embedded_broker(host="127.0.0.1", port=services.free_port(),
                                                    log_path=root / "broker.log")
            stack.callback(broker.stop)
            bootstrap = broker.bootstrap
        clickhouse_url = from_env.get("CLICKHOUSE_URL") or services.embedded_clickhouse_url(root / "clickhouse")
        _build_template(database_url)
        stack.callback(_drop_database, database_url, TEMPLATE_DB)
        yield Engines(database_url, bootstrap, clickhouse_url)


def _build_template(admin_url: str) -> None:
    """One migrated database per session; tests clone it (CREATE DATABASE ... TEMPLATE is ~50 ms)."""
    from meterline.stack import migrate

    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    migrate(_with_database(admin_url, TEMPLATE_DB))


def _drop_database(admin_url: str, name: str) -> None:
    with contextlib.suppress(psycopg.OperationalError), \
            psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _with_database(url: str, name: str) -> str:
    """Swap the database name in a PostgreSQL URL (works for socket URLs with ?host=...)."""
    from sqlalchemy.engine import make_url

    from ledger.db import sqlalchemy_url

    return make_url(sqlalchemy_url(url)).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def database_url(engines: Engines) -> Iterator[str]:
    """A fresh, fully migrated database for this test alone."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(libpq_url(engines.admin_database_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    yield _with_database(engines.admin_database_url, name)
    with psycopg.connect(libpq_url(engines.admin_database_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Topics:
    prefix: str
    bootstrap: str
    usage_partitions: int

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"


@pytest.fixture
def topics(engines: Engines) -> Topics:
    """Meterline's topics under a prefix unique to this test (4 partitions of usage events)."""
    from meterline.topics import ensure_topics, topic_specs

    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(engines.kafka_bootstrap_servers, topic_specs(
        prefix=prefix, usage_partitions=4, charges_partitions=2, transactions_partitions=2))
    return Topics(prefix, engines.kafka_bootstrap_servers, 4)


@pytest.fixture
def stack_env(engines: Engines, database_url: str, topics: Topics) -> dict[str, str]:
    """The environment a Meterline process needs to run against this test's database and topics."""
    return {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": engines.kafka_bootstrap_servers,
        "CLICKHOUSE_URL": engines.clickhouse_url,
        "METERLINE_TOPIC_PREFIX": topics.prefix,
        "METERLINE_ENV": "local",
    }


@pytest.fixture
def clear_settings_caches() -> Iterator[None]:
    """Settings are cached per process; tests that change the environment clear them on both sides."""
    import importlib

    def clear() -> None:
        for module_name in ("ledger.settings", "streams.settings", "api.settings", "analytics.settings",
                            "meterline.settings"):
            with contextlib.suppress(ModuleNotFoundError):
                module = importlib.import_module(module_name)
                module.get_settings.cache_clear()

    clear()
    yield
    clear()
