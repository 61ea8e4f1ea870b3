"""The bounded ``ingested_events`` log behind GET /api/v1/events (OpenMeter's "list ingested events").

Why a PostgreSQL table and not a read-back from Kafka: on this broker end offsets are wrong (DESIGN §5), so
"the last N events" cannot be read from the topic reliably, and a topic scan per request would not filter
by project, subject or id anyway. The log is a debugging view, NOT the source of truth (Kafka is):
- accepted events are recorded AFTER the broker acknowledged them, rejected ones with their reason
  (``validationError``), so the list shows what the API actually did;
- writing is off the request path: rows go to a bounded in-memory queue that a thread COPYs into
  PostgreSQL every ~200 ms. When the queue is full rows are dropped and counted (``dropped_rows``) rather
  than slowing ingestion down; a crash loses at most the queued rows of the log, never an event;
- retention is bounded twice: rows older than ``log_retention_hours`` and rows beyond the newest
  ``log_rows_max`` are pruned every ``log_prune_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, text

from api.ingest.validate import Accepted, Rejected

log = logging.getLogger("meterline.api.ingest")

_COPY = ("COPY ingested_events (project_id, event_id, source, subject, type, event_time, ingested_at, event, "
         "validation_error) FROM STDIN")
Row = tuple[str, str, str, str, str, str | None, str, str, str | None]


def _clean(value: Any, limit: int = 256) -> str:
    return str(value)[:limit].replace("\x00", "") if value is not None else ""


def accepted_rows(project_id: str, accepted: list[Accepted], ingested_at_iso: str) -> list[Row]:
    return [(project_id, a.event["id"], a.event["source"], a.event["subject"], a.event["type"], a.event["time"],
             ingested_at_iso, a.payload.decode("utf-8"), None) for a in accepted]


def rejected_rows(project_id: str, rejected: list[Rejected], ingested_at_iso: str) -> list[Row]:
    rows: list[Row] = []
    for r in rejected:
        raw = r.raw if isinstance(r.raw, dict) else {}
        rows.append((project_id, _clean(r.id), _clean(raw.get("source")), _clean(raw.get("subject")),
                     _clean(raw.get("type", raw.get("code"))), None, ingested_at_iso,
                     orjson.dumps(r.raw).decode("utf-8"), r.reason))
    return rows


class IngestLog:
    def __init__(self, engine: Engine, *, mode: str, queue_rows_max: int, retention_hours: float,
                 rows_max: int, prune_interval_s: float) -> None:
        self.engine = engine
        self.mode = mode
        self.queue_rows_max = queue_rows_max
        self.retention_hours = retention_hours
        self.rows_max = rows_max
        self.prune_interval_s = prune_interval_s
        self.dropped_rows = 0
        self.written_rows = 0
        self._queue: list[Row] = []
        self._cond = threading.Condition()
        self._stop = False
        self._busy = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ producers of rows (event loop)

    def record(self, project_id: str, accepted: list[Accepted], rejected: list[Rejected],
               ingested_at_iso: str) -> None:
        if self.mode == "off":
            return
        rows = rejected_rows(project_id, rejected, ingested_at_iso) if rejected else []
        if self.mode == "all" and accepted:
            rows.extend(accepted_rows(project_id, accepted, ingested_at_iso))
        if not rows:
            return
        with self._cond:
            room = self.queue_rows_max - len(self._queue)
            if room < len(rows):
                self.dropped_rows += len(rows) - max(room, 0)
                rows = rows[:max(room, 0)]
            self._queue.extend(rows)
            self._cond.notify()

    # ------------------------------------------------------------------ writer thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-log-writer", daemon=True)
        self._thread.start()

    def close(self, *, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait_written(self, *, timeout_s: float = 10.0) -> bool:
        """True once everything recorded so far is in the table (tests and shutdown use it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if not self._queue and not self._busy:
                    return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        next_prune = time.monotonic() + self.prune_interval_s
        while True:
            with self._cond:
                if not self._queue and not self._stop:
                    self._cond.wait(0.2)
                rows, self._queue = self._queue, []
                self._busy = bool(rows)
                stopping = self._stop
            if rows:
                self._write(rows)
                with self._cond:
                    self._busy = False
            if time.monotonic() >= next_prune:
                self.prune()
                next_prune = time.monotonic() + self.prune_interval_s
            if stopping:
                return
            if rows:
                time.sleep(0.2)  # batch rows up: one COPY per ~200 ms at most

    def _write(self, rows: list[Row]) -> None:
        try:
            raw = self.engine.raw_connection()
            try:
                pg = raw.driver_connection
                assert pg is not None
                with pg.cursor() as cur, cur.copy(_COPY) as copy:
                    for row in rows:
                        copy.write_row(row)
                pg.commit()
            finally:
                raw.close()
            self.written_rows += len(rows)
        except Exception:
            self.dropped_rows += len(rows)
            log.exception("could not write %d rows to the ingested_events log (events are unaffected)", len(rows))

    def prune(self) -> int:
        try:
            with self.engine.begin() as conn:
                old = conn.execute(text(
                    "DELETE FROM ingested_events WHERE ingested_at < now() - make_interval(secs => :s)"),
                    {"s": self.retention_hours * 3600}).rowcount
                over = conn.execute(text(
                    "DELETE FROM ingested_events WHERE id <= (SELECT max(id) FROM ingested_events) - :n"),
                    {"n": self.rows_max}).rowcount
            return int(old or 0) + int(over or 0)
        except Exception:
            log.exception("could not prune the ingested_events log")
            return 0


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LogQuery:
    project_id: str
    ingested_from: datetime
    ingested_to: datetime | None = None
    id_contains: str | None = None
    subject_contains: str | None = None
    time_from: datetime | None = None
    time_to: datetime | None = None
    limit: int = 100


def list_ingested(conn: Connection, query: LogQuery) -> list[dict[str, Any]]:
    """Newest first, in OpenMeter's IngestedEvent shape."""
    clauses = ["project_id = :project_id", "ingested_at >= :ingested_from"]
    params: dict[str, Any] = {"project_id": query.project_id, "ingested_from": query.ingested_from,
                              "limit": query.limit}
    if query.ingested_to is not None:
        clauses.append("ingested_at <= :ingested_to")
        params["ingested_to"] = query.ingested_to
    if query.id_contains:
        clauses.append("strpos(event_id, :id_contains) > 0")
        params["id_contains"] = query.id_contains
    if query.subject_contains:
        clauses.append("strpos(subject, :subject_contains) > 0")
        params["subject_contains"] = query.subject_contains
    if query.time_from is not None:
        clauses.append("event_time >= :time_from")
        params["time_from"] = query.time_from
    if query.time_to is not None:
        clauses.append("event_time <= :time_to")
        params["time_to"] = query.time_to
    rows = conn.execute(text(
        f"SELECT event::text AS event, validation_error, ingested_at, stored_at FROM ingested_events "
        f"WHERE {' AND '.join(clauses)} ORDER BY ingested_at DESC, id DESC LIMIT :limit"), params).all()
    out: list[dict[str, Any]] = []
    for row in rows:
        item: dict[str, Any] = {"event": orjson.loads(row.event), "ingestedAt": row.ingested_at.isoformat(),
                                "storedAt": row.stored_at.isoformat()}
        if row.validation_error:
            item["validationError"] = row.validation_error
        out.append(item)
    return out
