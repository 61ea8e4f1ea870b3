"""Fixtures of the pipeline tests (the harness itself is in pipeline_harness.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline_harness import Pipeline


@pytest.fixture
def pipeline(stack_env: dict[str, str], database_url: str, topics: Any, tmp_path: Path) -> Iterator[Pipeline]:
    run_id = uuid.uuid4().hex[:8]
    env = {**stack_env,
           "STREAMS_APP_ID": f"streams-{run_id}",
           "LEDGER_CONSUMER_GROUP": f"{topics.prefix}ledger-{run_id}",
           "STREAMS_FLUSH_MS_MAX": "200",
           "STREAMS_CATALOG_REFRESH_MS": "500",
           "METERLINE_LOG_LEVEL": "INFO"}
    p = Pipeline(env, database_url, topics.bootstrap, topics.prefix, topics.usage_partitions, tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
