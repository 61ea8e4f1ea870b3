"""The streams worker refuses to start loudly: missing topics, pending migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.db import libpq_url

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterline", "run", "streams"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_missing_topics_stop_the_worker_with_a_clear_error(stack_env: dict[str, str]) -> None:
    result = _run({**stack_env, "METERLINE_TOPIC_PREFIX": f"nothing-{uuid.uuid4().hex[:6]}."})
    assert result.returncode == 2
    assert "usage.events.v1" in result.stderr and "meterline topics create" in result.stderr


def test_pending_migrations_stop_the_worker(stack_env: dict[str, str], engines: Any) -> None:
    name = f"empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(engines.admin_database_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        from sqlalchemy.engine import make_url

        from ledger.db import sqlalchemy_url

        url = make_url(sqlalchemy_url(engines.admin_database_url)).set(database=name).render_as_string(
            hide_password=False)
        result = _run({**stack_env, "DATABASE_URL": url})
        assert result.returncode == 2
        assert "migrations are pending" in result.stderr
    finally:
        with psycopg.connect(libpq_url(engines.admin_database_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
