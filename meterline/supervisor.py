"""A small process supervisor: start children, restart the ones that die, stop them all in order.

Invariants:
- a child that exits while the supervisor is running is restarted, with a backoff that grows on repeated
  quick deaths (capped), and every restart is logged with the exit code;
- ``stop()`` sends SIGTERM to every child, waits, then SIGKILLs stragglers: no process is left behind;
- the state file is rewritten after every change so ``meterline status`` reads the truth;
- engines (embedded PostgreSQL, the broker's disk store, the broker) are watched first, in start order: a dead
  engine is restarted on the same port and data (logged as ``engine restarted``) before any child is looked at,
  and a failed restart is retried with the same capped backoff. The Meterline processes reconnect by themselves
  (librdkafka and the SQLAlchemy pools retry), or die and are restarted like any child;
- ``pause(name)`` stops a child and keeps it stopped (``meterline down`` stops ingest that way while it drains).
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
from typing import Protocol

import structlog

log = structlog.get_logger("meterline.supervisor")


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    """An engine the stack started (meterline.services.EngineProcess, EmbeddedPostgres)."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def alive(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def restart(self) -> None: ...


@dataclass
class WatchedEngine:
    key: str  # its name in the state file: "postgres", "diskstore", "broker"
    engine: Engine
    restarts: int = 0
    last_exit_code: int | None = None
    next_start_at: float = 0.0
    down_since: float | None = None
    failed_attempts: int = 0  # restarts that failed since it died (the backoff grows with them)


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit_code: int | None = None
    next_start_at: float = 0.0
    paused: bool = False


class Supervisor:
    def __init__(self, specs: list[ChildSpec], *, base_env: dict[str, str], log_dir: Path,
                 state_path: Path, extra_state: dict[str, object], backoff_s_max: float = 10.0,
                 engines: list[tuple[str, Engine]] | None = None) -> None:
        self.children = [Child(spec) for spec in specs]
        self.engines = [WatchedEngine(key, engine) for key, engine in engines or []]
        self.base_env = base_env
        self.log_dir = log_dir
        self.state_path = state_path
        self.extra_state = extra_state
        self.backoff_s_max = backoff_s_max
        self.stopping = False
        self._pause_requests: list[str] = []

    def request_pause(self, name: str) -> None:
        """Safe from a signal handler: the loop pauses the child on its next round."""
        self._pause_requests.append(name)

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

    def poll_engines(self) -> bool:
        """Restart engines that died, in start order; True when something changed."""
        now = time.time()
        changed = False
        for watched in self.engines:
            if self.stopping:
                return changed
            if watched.engine.alive():
                watched.down_since = None
                continue
            if watched.down_since is None:
                watched.down_since = now
                watched.last_exit_code = watched.engine.exit_code()
                log.error("engine died; restarting", engine=watched.key, exit_code=watched.last_exit_code,
                          pid=watched.engine.pid)
                changed = True
            if now < watched.next_start_at:
                continue
            try:
                watched.engine.restart()
            except Exception as exc: # any failure is retried; the message names the cause
                delay = min(self.backoff_s_max, 0.5 * 2 ** min(watched.failed_attempts, 5))
                watched.next_start_at = time.time() + delay
                watched.failed_attempts += 1
                log.error("engine restart failed; retrying", engine=watched.key, error=str(exc), retry_in_s=delay)
                changed = True
                continue
            watched.restarts += 1
            log.warning("engine restarted", engine=watched.key, restarts=watched.restarts, pid=watched.engine.pid,
                        down_s=round(time.time() - watched.down_since, 2))
            watched.down_since = None
            watched.failed_attempts = 0
            changed = True
        return changed

    def pause(self, name: str) -> bool:
        """Stop the named child and keep it stopped until the supervisor stops. False if there is no such child."""
        for child in self.children:
            if child.spec.name == name:
                child.paused = True
                if child.process is not None and child.process.poll() is None:
                    _signal_group(child.process.pid, signal.SIGTERM)
                log.warning("child paused", child=name)
                self.write_state()
                return True
        return False

    def poll_once(self) -> None:
        """Restart engines and children that died. Call in a loop."""
        changed = self.poll_engines()
        now = time.time()
        for child in self.children:
            proc = child.process
            if proc is not None and child.paused:
                if proc.poll() is not None:
                    child.process = None
                    child.last_exit_code = proc.returncode
                    changed = True
                continue
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
            if child.process is None and not self.stopping and not child.paused and now >= child.next_start_at:
                child.restarts += 1
                self._start(child)
                log.warning("child restarted", child=child.spec.name, restarts=child.restarts,
                            pid=child.process.pid if child.process else None)
                changed = True
        if changed:
            self.write_state()

    def run_forever(self, *, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            while self._pause_requests:
                self.pause(self._pause_requests.pop())
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
                    "paused": c.paused,
                }
                for c in self.children
            },
            "engines": self.engines_view(),
            **({"broker_pid": broker_pid} if (broker_pid := self._engine_pid("broker")) is not None else {}),
        }

    def engines_view(self) -> dict[str, dict[str, object]]:
        """The supervisor's view of each engine it watches (for `meterline status`): pid, alive, restarts."""
        return {w.key: {"name": w.engine.name, "pid": w.engine.pid, "alive": w.down_since is None,
                        "restarts": w.restarts, "last_exit_code": w.last_exit_code}
                for w in self.engines}

    def _engine_pid(self, key: str) -> int | None:
        for w in self.engines:
            if w.key == key:
                return w.engine.pid
        return None

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
