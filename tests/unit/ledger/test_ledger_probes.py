"""ledger/probes.py over real HTTP on 127.0.0.1: /health, /ready (503 with the failing check's detail), /metrics in
the Prometheus format, and a taken port that leaves the process running without probes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from ledger.probes import ProbeServer, ready_report, start_probe_server


def test_ready_report_runs_every_check_and_a_raising_check_fails_with_its_error() -> None:
    def broken() -> tuple[bool, str]:
        raise ConnectionError("refused")

    ready, body = ready_report({"db": lambda: (True, "answers"), "broker": broken})
    assert ready is False
    assert body["checks"]["db"] == {"ok": True, "detail": "answers"}
    assert body["checks"]["broker"] == {"ok": False, "detail": "ConnectionError: refused"}
    assert ready_report({"db": lambda: (True, "answers")})[0] is True


@pytest.fixture
def probes() -> Iterator[tuple[ProbeServer, dict[str, bool], Counter]]:
    registry = CollectorRegistry()
    counter = Counter("meterline_test_things_total", "things", ["kind"], registry=registry)
    state = {"assigned": False}
    server = start_probe_server("unit", host="127.0.0.1", port=0, registry=registry,
                                checks={"partitions": lambda: (state["assigned"], "assigned" if state["assigned"]
                                                               else "no assignment yet")})
    assert server is not None
    yield server, state, counter
    server.stop()


def test_health_ready_and_metrics(probes: tuple[ProbeServer, dict[str, bool], Counter]) -> None:
    server, state, counter = probes
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "component": "unit"}
    r = httpx.get(f"{base}/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["partitions"] == {"ok": False, "detail": "no assignment yet"}
    state["assigned"] = True
    assert httpx.get(f"{base}/ready").status_code == 200
    counter.labels("a").inc(3)
    r = httpx.get(f"{base}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("meterline_test_things_total", (("kind", "a"),))] == 3
    assert httpx.get(f"{base}/elsewhere").status_code == 404


def test_a_taken_port_is_logged_and_the_process_goes_on_without_probes() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert start_probe_server("unit", host="127.0.0.1", port=port, checks={}) is None
