"""Shared by the dashboard's browser tests: a real api process on this session's engines, headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from meterline.services import free_port


@pytest.fixture
def api_url(stack_env, tmp_path) -> Any:
    port = free_port()
    env = {**os.environ, **stack_env, "API_PORT": str(port), "API_HOST": "127.0.0.1",
           "CLICKHOUSE_URL": f"chdb://{(tmp_path / 'clickhouse').resolve()}",
           "ANALYTICS_BATCH_AGE_MS_MAX": "100", "API_AUTH_RATE_LIMIT_PER_S": "1000",
           "API_AUTH_RATE_LIMIT_BURST": "1000"}
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from api.server import main; main()"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        time.sleep(0.2)
    else:
        raise AssertionError("api did not become healthy")
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


@pytest.fixture
def browser():
    from chromium_cdp import Browser

    b = Browser()
    yield b
    b.close()
