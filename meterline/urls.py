"""Where the engines are, for CLI commands that talk to them directly (catalog, reconcile).

Order: the environment (``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``, ``CLICKHOUSE_URL``), else the running
local stack (its ``stack.json``), else a clear error saying how to get one."""

from __future__ import annotations

import os

from meterline.settings import get_settings

ENV_NAMES = {"database_url": "DATABASE_URL", "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
             "clickhouse_url": "CLICKHOUSE_URL"}


class EngineUrlMissing(RuntimeError):
    pass


def engine_url(name: str) -> str:
    """``name`` is one of ENV_NAMES' keys."""
    from meterline import stack

    env_name = ENV_NAMES[name]
    if os.environ.get(env_name):
        return os.environ[env_name]
    report = stack.status(get_settings())
    urls = report.get("urls") if report.get("running") else None
    if isinstance(urls, dict) and urls.get(name):
        return str(urls[name])
    raise EngineUrlMissing(f"{env_name} is not set and no local stack is running "
                           f"(start one with `meterline up --detach`, or set {env_name})")
