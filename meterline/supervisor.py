"""A small process supervisor: start children, restart the ones that die, stop them all in order.

Invariants:
- a child that exits while the supervisor is running is restarted, with a backoff that grows on repeated
  quick deaths (capped), and every restart is logged with the exit code;
- ``stop()`` sends SIGTERM to every child, waits, then SIGKILLs stragglers: no process is left behind;
- the state file is rewritten after every change so ``meterline status`` reads the truth.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("meterline.supervisor")


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit_code: int | None = None
    next_start_at: float = 0.0


class Supervisor:
    def __init__(self, specs: list[ChildSpec], *, base_env: dict[str, str], log_dir: Path,
                 state_path: Path, extra_state: dict[str, object], backoff_s_max: float = 10.0) -> None:
        self.children = [Child(spec) for spec in specs]
        self.base_env = base_env
        self.log_dir = log_dir
        self.state_path = state_path
        self.extra_state = extra_state
        self.backoff_s_max = backoff_s_max
        self.stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start_all(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children:
            self._start(child)
        self.write_state()

    def _start(self, child: Child) -> None:
        out = (self.log_dir / f"{child.spec.name}.log").open("ab")
        env = {**self.base_env, **child.spec.env}
        child.process = subprocess.Popen(child.spec.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        out.close()
        child.started_at = time.time()
        log.info("child started", child=child.spec.name, pid=child.process.pid)

    def poll_once(self) -> None:
        """Restart children that died. Call in a loop."""
        now = time.time()
        changed = False
        for child in self.children:
            proc = child.process
            if proc is not None and proc.poll() is not None and not self.stopping:
                child.last_exit_code = proc.returncode
                lived_s = now - child.started_at
                # quick deaths back off exponentially; a child that ran a while restarts at once
                delay = 0.0 if lived_s > 30 else min(self.backoff_s_max, 0.5 * 2 ** min(child.restarts, 5))
                child.next_start_at = now + delay
                child.process = None
                log.warning("child exited; restarting", child=child.spec.name, exit_code=proc.returncode,
                            lived_s=round(lived_s, 1), restart_in_s=delay)
                changed = True
            if child.process is None and not self.stopping and now >= child.next_start_at:
                child.restarts += 1
                self._start(child)
                log.warning("child restarted", child=child.spec.name, restarts=child.restarts,
                            pid=child.process.pid if child.process else None)
                changed = True
        if changed:
            self.write_state()

    def run_forever(self, *, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.poll_once()
            time.sleep(0.2)

    def stop(self, *, timeout_s: float = 15.0) -> None:
        self.stopping = True
        live = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for proc in live:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.warning("child ignored SIGTERM; killing", pid=proc.pid)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        for child in self.children:
            child.process = None
        self.write_state()

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, object]:
        return {
            **self.extra_state,
            "supervisor_pid": os.getpid(),
            "stopping": self.stopping,
            "children": {
                c.spec.name: {
                    "pid": c.process.pid if c.process else None,
                    "started_at": c.started_at,
                    "restarts": c.restarts,
                    "last_exit_code": c.last_exit_code,
                }
                for c in self.children
            },
        }

    def write_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(self.state_path)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def component_argv(component: str) -> list[str]:
    """Each child is `meterline run <component>` in this same interpreter."""
    return [sys.executable, "-m", "meterline", "run", component]
