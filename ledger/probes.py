"""Every Meterline process's probe endpoints: ``/health``, ``/ready`` and ``/metrics`` on one small HTTP port.

- ``/health`` (liveness): 200 while the process can answer at all. A hung process (stopped, deadlocked GIL)
  does not answer, which is what a supervisor or ``meterline status`` needs to see.
- ``/ready`` (readiness): 200 when every check of the process passes (engines reachable, partitions assigned,
  consumer loop running, not halted), else 503; the body lists each check, so the reason is visible.
- ``/metrics``: the process's Prometheus registry in the text exposition format, served by prometheus-client.

The API serves the same three paths on its own port (api/health.py); the other processes (streams,
ledger, analytics, scheduler) call ``start_probe_server`` with the port of their settings. The server runs in a
daemon thread, so a probe never waits for the process's main loop; checks must therefore be cheap and
thread-safe (read a flag or a timestamp, or run one short query with a timeout).

Lives in ``ledger`` because every component may import it (ledger is the bottom layer; like ledger/db.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy import Engine, text

__all__ = ["Check", "ProbeServer", "database_check", "ready_report", "start_probe_server"]

log = structlog.get_logger("ledger.probes")

#: a readiness check: name -> (ok, detail). Details are short strings for people (what is wrong).
Check = Callable[[], tuple[bool, str]]


def ready_report(checks: Mapping[str, Check]) -> tuple[bool, dict[str, Any]]:
    """Run every check (a check that raises fails with the error as detail); overall ready = all passed."""
    results: dict[str, Any] = {}
    ready = True
    for name, check in checks.items():
        try:
            ok, detail = check()
        except Exception as error:  # a probe must answer, never crash: the error IS the detail
            ok, detail = False, f"{type(error).__name__}: {error}"
        results[name] = {"ok": ok, "detail": detail}
        ready = ready and ok
    return ready, {"status": "ready" if ready else "not_ready", "checks": results}


def database_check(engine: Engine) -> Check:
    """PostgreSQL answers ``SELECT 1`` within 2 s (through the process's own pool)."""

    def check() -> tuple[bool, str]:
        with engine.connect() as conn:
            conn.execute(text("SET LOCAL statement_timeout = 2000"))
            conn.execute(text("SELECT 1"))
            conn.rollback()
        return True, "PostgreSQL answers"
    return check


@dataclass
class ProbeServer:
    component: str
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_probe_server(component: str, *, host: str, port: int, checks: Mapping[str, Check],
                       registry: CollectorRegistry = REGISTRY) -> ProbeServer | None:
    """Serve /health, /ready and /metrics on ``host:port`` (0 = any free port; read it from ``.port``).

    A port that cannot be bound is logged loudly and the process goes on without probes (None): observability
    must never stop the money path. ``meterline up`` picks free ports, so there this only happens on a race."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/health":
                self._json(200, {"status": "ok", "component": component})
            elif path == "/ready":
                ready, body = ready_report(checks)
                self._json(200 if ready else 503, {**body, "component": component})
            else:
                self._json(404, {"status": "not_found", "paths": ["/health", "/ready", "/metrics"]})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, orjson.dumps(body), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
            return

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        log.error("probe_server_not_started", component=component, host=host, port=port, error=str(error),
                  detail="no /health, /ready or /metrics for this process; set another port in its settings")
        return None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"{component}-probes", daemon=True)
    thread.start()
    probe = ProbeServer(component, server, thread)
    log.info("probe_server_started", component=component, host=host, port=probe.port,
             paths=["/health", "/ready", "/metrics"])
    return probe
