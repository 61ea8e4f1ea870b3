"""Invariant 12 on the embedded stack, as a user meets it: accepted events survive a broker kill -9 and
`down`/`up`; the supervisor restarts dead engines; `down` drains; `up` fails fast. Real processes, real signals.

Each money check is exact: the wallet must end at the balance priced here from the events the API accepted
(``plan_demo``), never below (overcharged) and not stuck above it (events lost)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from stack_testkit import CLI, run_cli, stack_env

from ledger.db import libpq_url

pytestmark = pytest.mark.integration



def _state(home: Path) -> dict[str, Any]:
    return json.loads((home / "stack.json").read_text())  # type: ignore[no-any-return]


def _up(env: dict[str, str]) -> None:
    result = run_cli("up", "--detach", "--timeout-s", "90", env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def home() -> Iterator[Path]:
    """Outside pytest's tmp tree (see test_stack.py: the embedded PostgreSQL's user must traverse it)."""
    root = Path(tempfile.mkdtemp(prefix="meterline-durable-test-"))
    root.chmod(0o755)
    yield root / "home"
    env = {**os.environ, "METERLINE_HOME": str(root / "home")}
    subprocess.run([*CLI, "down", "--now"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)


def _project(env: dict[str, str], events: int, seed: int) -> tuple[Any, dict[str, str], str]:
    from meterline.cli_demo import _set_up_project, plan_demo

    plan = plan_demo(events=events, seed=seed)
    api_url = f"http://127.0.0.1:{env['METERLINE_API_PORT']}"
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        ids = _set_up_project(http, plan)
    return plan, ids, api_url


def _send(api_url: str, api_key: str, events: list[dict[str, Any]], *, batch_size: int = 100) -> int:
    from meterline.client import MeterlineClient

    with MeterlineClient(api_url, api_key, batch_size=batch_size) as client:
        result = client.send(events)
    assert not result.rejected
    return result.accepted


def _balance(api_url: str, ids: dict[str, str]) -> int:
    """Through the API, as a user reads it: one login per client (the login endpoint is rate limited)."""
    token = _TOKENS.get(ids["email"])
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        if token is None:
            login = http.post("/api/v1/auth/login", json={"email": ids["email"], "password": ids["password"]})
            token = _TOKENS[ids["email"]] = login.json()["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"
        wallet = http.get(f"{ids['base']}/wallets/{ids['wallet']}").json()
    return int(wallet["balance"]["balance_minor"])


_TOKENS: dict[str, str] = {}


def _wait_for_exact_balance(api_url: str, ids: dict[str, str], expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    balance = None
    while time.monotonic() < deadline:
        try:
            balance = _balance(api_url, ids)
        except (httpx.HTTPError, KeyError):  # the API restarting after an engine came back
            time.sleep(1.0)
            continue
        assert balance >= expected, f"balance {balance} below the expected {expected}: overcharged"
        if balance == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"balance {balance} never reached {expected}: accepted usage was lost")


def test_broker_kill_9_under_load_loses_nothing(home: Path) -> None:
    env = stack_env(home)
    _up(env)
    plan, ids, api_url = _project(env, events=6_000, seed=11)
    accepted: list[int] = []
    sender = threading.Thread(
        target=lambda: accepted.append(_send(api_url, ids["api_key"], plan.events, batch_size=25)))
    sender.start()
    time.sleep(1.0)  # some batches acknowledged, most not yet metered, most not yet sent
    state = _state(home)
    broker_pid = state.get("engines", {}).get("broker", {}).get("pid") or state["broker_pid"]
    os.kill(broker_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    sender.join(timeout=180)
    assert not sender.is_alive() and accepted == [len(plan.events)], "the SDK must get every event accepted"

    _wait_for_exact_balance(api_url, ids, plan.grant_minor - plan.expected_charge_minor, timeout_s=150)
    engines = _state(home)["engines"]
    assert engines["broker"]["restarts"] == 1 and engines["broker"]["pid"] != broker_pid
    log = (home / "logs" / "supervisor.log").read_text()
    assert '"engine restarted"' in log and '"broker"' in log
    print(f"broker kill -9 -> exact after {time.monotonic() - killed_at:.1f} s")


def test_down_now_with_events_in_flight_then_up_is_exact_and_reconcile_covers_them(home: Path) -> None:
    env = stack_env(home)
    _up(env)
    plan, ids, api_url = _project(env, events=4_000, seed=12)
    assert _send(api_url, ids["api_key"], plan.events, batch_size=500) == len(plan.events)
    result = run_cli("down", "--now", env=env)  # at once: most of it is acknowledged but not metered yet
    assert result.returncode == 0, result.stderr
    _up(env)
    _wait_for_exact_balance(api_url, ids, plan.grant_minor - plan.expected_charge_minor, timeout_s=150)

    # a durable topic keeps its life across the restart: no new identity, the marks stay valid...
    database_url = _state(home)["urls"]["database_url"]
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        lives = conn.execute("SELECT topic, epoch FROM source_logs WHERE topic = 'usage.events.v1'").fetchall()
        assert lives == [("usage.events.v1", 0)]
    # ...so `meterline reconcile` replays the events from before the restart: faithful, then a corrupted
    # counter of those events is caught (before durable topics it only saw the new, empty life)
    result = run_cli("reconcile", "--timeout-s", "90", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        assert conn.execute("UPDATE usage_counters SET units = units + 1 "
                            "WHERE source_topic = 'usage.events.v1'").rowcount >= 1
    result = run_cli("reconcile", "--timeout-s", "90", env=env)
    assert result.returncode == 1, result.stdout + result.stderr


def test_down_drains_accepted_events_before_stopping(home: Path) -> None:
    from meterline import services

    env = stack_env(home)
    _up(env)
    plan, ids, api_url = _project(env, events=4_000, seed=13)
    assert _send(api_url, ids["api_key"], plan.events, batch_size=500) == len(plan.events)
    result = run_cli("down", env=env, timeout_s=300)
    assert result.returncode == 0, result.stderr
    assert "drained in" in result.stderr, result.stderr

    # with everything stopped, the ledger already holds the exact balance: nothing was left for later
    url = services.start_embedded_postgres(home / "postgres")
    try:
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            balance = conn.execute("SELECT balance_minor FROM wallets WHERE id = %s", (ids["wallet"],)).fetchone()
            unrelayed = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    finally:
        services.stop_embedded_postgres(home / "postgres")
    assert balance == (plan.grant_minor - plan.expected_charge_minor,)
    assert unrelayed == (0,)


def test_a_killed_postgres_and_disk_store_are_restarted_and_the_processes_carry_on(home: Path) -> None:
    env = stack_env(home)
    _up(env)
    plan, ids, api_url = _project(env, events=1_000, seed=14)
    first, second = plan.events[:500], plan.events[500:]
    assert _send(api_url, ids["api_key"], first) == len(first)
    state = _state(home)
    os.kill(state["engines"]["postgres"]["pid"], signal.SIGKILL)
    os.kill(state["engines"]["diskstore"]["pid"], signal.SIGKILL)
    _wait(lambda: all(_state(home)["engines"][k]["restarts"] >= 1 for k in ("postgres", "diskstore")), 60,
          "PostgreSQL and the disk store to be restarted")
    assert _send(api_url, ids["api_key"], second) == len(second)
    _wait_for_exact_balance(api_url, ids, plan.grant_minor - plan.expected_charge_minor, timeout_s=150)
    children = _state(home)["children"]
    alive = {name: bool(info["pid"]) and psutil.pid_exists(info["pid"]) for name, info in children.items()}
    assert all(alive.values()), alive


def test_up_with_a_busy_port_fails_fast_names_it_and_leaves_nothing(home: Path) -> None:
    env = stack_env(home)
    before = {p.pid for p in psutil.process_iter()}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["METERLINE_API_PORT"])))
        holder.listen()
        started = time.monotonic()
        result = run_cli("up", "--detach", "--timeout-s", "60", env=env)
        elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert f"port {env['METERLINE_API_PORT']} is in use" in result.stderr, result.stderr
    assert not (home / "postgres" / "postmaster.pid").exists(), "embedded PostgreSQL left running"
    time.sleep(0.5)
    ours = [p for p in psutil.process_iter(["pid", "cmdline"])
            if p.pid not in before and str(home) in " ".join(p.info["cmdline"] or [])]
    assert ours == [], f"processes left behind: {ours}"
