"""What the stack tests share: the environment of a private embedded stack and the CLI run as a user runs it.

Each test gets its own home and free ports, so stacks of concurrent sessions never meet; the engines' URLs of the
test session are removed from the environment, so `meterline up` starts its own embedded engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meterline.services import free_port

CLI = [sys.executable, "-m", "meterline"]


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")}
    env.update({"METERLINE_HOME": str(home), "METERLINE_KAFKA_PORT": str(free_port()),
                "METERLINE_STORE_PORT": str(free_port()), "METERLINE_API_PORT": str(free_port()),
                "METERLINE_STREAMS_WORKERS": "1"})
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout_s)
