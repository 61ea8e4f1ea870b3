"""Continuous reconciliation reports (ledger_0011): what the scheduler's replay of the usage log found.

``record_report`` stores one finished replay (meterline/reconcile_job.py); ``latest_report`` is one project's view
of the newest: when it ran, up to which marks, and the keys of that project whose ledger counters differ from the
log (wallet, meter, period, price version, both sides' units, the amount a `meterline replay --apply` would post).
Since ledger_0014 a report also compares ClickHouse usage and credit flow: ``coverage`` (what each of the four
records was compared up to) and ``mismatches`` (ledger/reconcile_compare.py: every key whose records disagree and
WHICH records disagree)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

__all__ = ["ProjectReport", "Summary", "latest_report", "latest_summary", "record_report"]


def record_report(conn: Connection, *, source_topic: str, replay_id: str, marks: dict[str, int],
                  started_at: datetime, messages: int, incomplete: Sequence[int],
                  differences: Sequence[dict[str, Any]], drift_minor: int,
                  coverage: dict[str, Any] | None = None, mismatches: Sequence[dict[str, Any]] = ()) -> int:
    return int(conn.execute(text("""
        INSERT INTO reconciliation_reports (source_topic, replay_id, marks, started_at, messages, incomplete,
                                            differences, drift_minor, coverage, mismatches)
        VALUES (:source, :rid, CAST(:marks AS jsonb), :started, :messages, CAST(:incomplete AS integer[]),
                CAST(:differences AS jsonb), :drift, CAST(:coverage AS jsonb), CAST(:mismatches AS jsonb))
        RETURNING id
    """), {"source": source_topic, "rid": replay_id, "marks": orjson.dumps(marks).decode(), "started": started_at,
           "messages": messages, "incomplete": list(incomplete), "differences": orjson.dumps(differences).decode(),
           "drift": drift_minor, "coverage": orjson.dumps(coverage or {}).decode(),
           "mismatches": orjson.dumps(list(mismatches)).decode()}).scalar_one())


@dataclass(frozen=True)
class ProjectReport:
    id: int
    source_topic: str
    replay_id: str
    started_at: datetime
    finished_at: datetime
    messages: int
    complete: bool
    differences: list[dict[str, Any]]  # this project's keys only (log vs ledger replay)
    coverage: dict[str, Any]  # per record: compared or not, up to where (the whole report, every project)
    mismatches: list[dict[str, Any]]  # this project's keys only (four records)

    @property
    def drift_minor(self) -> int:
        return sum(int(d.get("amount_minor") or 0) for d in self.differences)

    def drift_by_wallet(self) -> list[dict[str, Any]]:
        """Per wallet: the records that disagree on it, its mismatched keys, and the money drift per pair."""
        wallets: dict[str, dict[str, Any]] = {}
        for m in self.mismatches:
            w = wallets.setdefault(m["wallet_id"], {"wallet_id": m["wallet_id"], "disagreeing": [], "keys": 0,
                                                    "amount_minor": 0})
            w["keys"] += 1
            w["amount_minor"] += abs(int(m.get("amount_minor") or 0))
            w["disagreeing"] = sorted(set(w["disagreeing"]) | set(m["disagreeing"]))
        return [wallets[k] for k in sorted(wallets)]


def latest_report(conn: Connection, project_id: str) -> ProjectReport | None:
    row = conn.execute(text("""
        SELECT id, source_topic, replay_id, started_at, finished_at, messages, incomplete,
               coalesce((SELECT jsonb_agg(d) FROM jsonb_array_elements(differences) AS d
                         WHERE d ->> 'project_id' = :p), '[]'::jsonb) AS mine, coverage,
               coalesce((SELECT jsonb_agg(m) FROM jsonb_array_elements(mismatches) AS m
                         WHERE m ->> 'project_id' = :p), '[]'::jsonb) AS my_mismatches
        FROM reconciliation_reports ORDER BY finished_at DESC, id DESC LIMIT 1
    """), {"p": project_id}).one_or_none()
    if row is None:
        return None
    return ProjectReport(int(row.id), row.source_topic, row.replay_id, row.started_at, row.finished_at,
                         int(row.messages), not row.incomplete, list(row.mine), dict(row.coverage),
                         list(row.my_mismatches))


@dataclass(frozen=True)
class Summary:
    """The latest report across every project (``/healthz``): when, and how many wallets each record disagrees on."""

    id: int
    finished_at: datetime
    disagreeing_wallets: dict[str, int]

    @property
    def ok(self) -> bool:
        return not any(self.disagreeing_wallets.values())


def latest_summary(conn: Connection) -> Summary | None:
    row = conn.execute(text("""
        SELECT r.id, r.finished_at,
               coalesce((SELECT jsonb_object_agg(record, wallets) FROM (
                   SELECT rec AS record, count(DISTINCT (m ->> 'project_id', m ->> 'wallet_id')) AS wallets
                   FROM jsonb_array_elements(r.mismatches) AS m, jsonb_array_elements_text(m -> 'disagreeing') AS rec
                   GROUP BY rec) AS per_record), '{}'::jsonb) AS disagreeing
        FROM reconciliation_reports r ORDER BY r.finished_at DESC, r.id DESC LIMIT 1
    """)).one_or_none()
    if row is None:
        return None
    return Summary(int(row.id), row.finished_at, {k: int(v) for k, v in dict(row.disagreeing).items()})
