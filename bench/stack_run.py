"""A private `meterline up --detach` stack for the benchmarks that need every process kind (api, streams, ledger,
analytics, scheduler) under the supervisor: its environment, the CLI as a user runs it, and the state file.

Shared by bench/durability.py and bench/chaos.py. The engines' URLs of the caller's environment are removed, so
`up` starts its own embedded PostgreSQL and Tansu broker (topics on disk) on free ports under a temporary home."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline import services

CLI = [sys.executable, "-m", "meterline"]


def cli(*args: str, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def stack_env(home: Path, *, workers: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")}
    env.update({"METERLINE_HOME": str(home), "METERLINE_KAFKA_PORT": str(services.free_port()),
                "METERLINE_STORE_PORT": str(services.free_port()),
                "METERLINE_API_PORT": str(services.free_port()), "METERLINE_STREAMS_WORKERS": str(workers)})
    env.update(extra)
    return env


@dataclass
class Stack:
    env: dict[str, str]
    home: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['METERLINE_API_PORT']}"

    def state(self) -> dict[str, Any]:
        return json.loads((self.home / "stack.json").read_text())  # type: ignore[no-any-return]

    @property
    def urls(self) -> dict[str, str]:
        return self.state()["urls"]  # type: ignore[no-any-return]

    def children(self) -> dict[str, dict[str, Any]]:
        """name -> {pid, restarts, last_exit_code, ...} as the supervisor last wrote them."""
        return self.state()["children"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def running_stack(*, workers: int, prefix: str, up_timeout_s: float = 180, keep_logs: Path | None = None,
                  **extra_env: str) -> Iterator[Stack]:
    """`meterline up --detach` in a fresh temporary home; `down --now` and the home removed on exit (the
    processes' and engines' logs copied to ``keep_logs`` first, when given)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # the embedded PostgreSQL's user must traverse it
        home = root / "home"
        env = stack_env(home, workers=workers, **extra_env)
        up = cli("up", "--detach", "--timeout-s", str(int(up_timeout_s)), env=env, timeout_s=up_timeout_s + 60)
        if up.returncode != 0:
            cli("down", "--now", env=env)
            raise SystemExit(f"meterline up failed:\n{up.stdout}\n{up.stderr}")
        try:
            yield Stack(env, home)
        finally:
            cli("down", "--now", env=env)
            if keep_logs is not None:
                shutil.copytree(home / "logs", keep_logs, dirs_exist_ok=True)
