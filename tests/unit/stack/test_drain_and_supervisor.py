"""`down`'s drain arithmetic and the supervisor's engine restarts (pure core; the real thing runs in
tests/integration/test_durable_stack.py)."""

from __future__ import annotations

import json
from pathlib import Path

from meterline.drain import DrainProgress, backlog
from meterline.supervisor import Supervisor


def test_backlog_counts_records_past_the_applied_mark_per_partition() -> None:
    # log end = next offset; applied_through = last applied offset (-1: nothing)
    assert backlog({0: 100, 1: 50, 2: 0}, {0: 99, 1: 9}) == 40
    assert backlog({0: 100}, {}) == 100
    assert backlog({0: 100}, {0: 120}) == 0  # never negative (a mark past a short end read)
    assert DrainProgress(0, 0, True).done and not DrainProgress(0, 1, True).done


class FakeEngine:
    """Stands in for a process; the supervisor only asks alive/restart/pid."""

    name = "fake engine"

    def __init__(self, fail_restarts: int = 0) -> None:
        self.running = True
        self.pid: int | None = 1000
        self.fail_restarts = fail_restarts
        self.restart_calls = 0

    def alive(self) -> bool:
        return self.running

    def exit_code(self) -> int | None:
        return None if self.running else -9

    def restart(self) -> None:
        self.restart_calls += 1
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise RuntimeError("port still held")
        self.running = True
        self.pid = (self.pid or 0) + 1


def _supervisor(tmp_path: Path, engine: FakeEngine) -> Supervisor:
    return Supervisor([], base_env={}, log_dir=tmp_path, state_path=tmp_path / "stack.json", extra_state={},
                      engines=[("broker", engine)], backoff_s_max=0.0)


def test_a_dead_engine_is_restarted_and_the_state_file_names_the_new_pid(tmp_path: Path) -> None:
    engine = FakeEngine()
    supervisor = _supervisor(tmp_path, engine)
    supervisor.poll_once()
    assert engine.restart_calls == 0
    engine.running = False
    supervisor.poll_once()
    assert engine.restart_calls == 1 and engine.running
    state = json.loads((tmp_path / "stack.json").read_text())
    assert state["engines"]["broker"]["restarts"] == 1
    assert state["engines"]["broker"]["last_exit_code"] == -9
    assert state["broker_pid"] == engine.pid == 1001


def test_a_failed_restart_is_retried_not_counted_as_a_restart(tmp_path: Path) -> None:
    engine = FakeEngine(fail_restarts=2)
    supervisor = _supervisor(tmp_path, engine)
    engine.running = False
    for _ in range(3):
        supervisor.poll_once()
    assert engine.restart_calls == 3 and engine.running
    assert supervisor.engines_view()["broker"]["restarts"] == 1
