"""`meterline loadgen`'s parts: find (or create) the meter of the event type, shape events the meter can
count, and read back from the pipeline what became of them.

What the report says, and where each figure comes from (never from the API's acceptance alone — a run whose
every event is dead-lettered must not look like a success):

- accepted: the ingest API's answers;
- dead-lettered: letters on ``usage.events.dlq.v1`` whose refused event has this run's unique ``source``
  (streams/dead_letters.py puts the decoded event in every letter);
- charged: events and credits the ledger counted for this run's subjects under the meter
  (``usage_counters.events`` / ``usage_charges.charged_minor``, after minus before the run).

The run is settled once charged + dead-lettered = accepted, or unsettled after ``settle_s`` (for example
events the meter's filters leave out, or a stopped worker). loadgen fails unless something was charged.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

__all__ = ["LoadgenReport", "MeterChoice", "PipelineCounts", "choose_meter", "event_data", "exit_code"]

_SIMPLE_PATH = re.compile(r"^\$(\.[A-Za-z_][A-Za-z0-9_-]*)+$")


@dataclass(frozen=True)
class MeterChoice:
    meter: dict[str, Any] | None  # the meter counting the type, or None
    others: list[str]  # "slug (event_type)" of the project's meters, for the error message


def choose_meter(meters: list[dict[str, Any]], event_type: str) -> MeterChoice:
    """The first current meter whose ``event_type`` is the one loadgen sends."""
    matching = [m for m in meters if m.get("event_type") == event_type and not m.get("archived_at")]
    return MeterChoice(matching[0] if matching else None,
                       [f"{m['slug']} ({m['event_type']})" for m in meters if not m.get("archived_at")])


def event_data(meter: dict[str, Any], value: int) -> dict[str, Any]:
    """An event ``data`` the meter reads ``value`` from: ``{"tokens": v}`` for ``$.tokens``, nested objects for
    ``$.a.b``; COUNT meters (no value property) get the same shape under ``tokens``."""
    path = meter.get("value_property") or "$.tokens"
    if not _SIMPLE_PATH.match(path):
        raise ValueError(f"loadgen cannot shape events for the value property {path!r} (use a meter with a "
                         "simple $.a.b path)")
    keys = path[2:].split(".")
    data: dict[str, Any] = {}
    cursor = data
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    return data


@dataclass(frozen=True)
class PipelineCounts:
    charged_events: int
    charged_minor: int


@dataclass
class LoadgenReport:
    sent: int
    accepted: int
    dead_lettered: int = 0
    charged_events: int = 0
    charged_minor: int = 0
    settled: bool = False
    reasons: dict[str, int] | None = None

    @property
    def unaccounted(self) -> int:
        return self.accepted - self.dead_lettered - self.charged_events


def exit_code(report: LoadgenReport) -> int:
    """0 only when the pipeline charged something; 1 otherwise (everything rejected, unpriced or not yet
    charged within the settle time)."""
    return 0 if report.charged_events > 0 else 1


# ----------------------------------------------------------------------------------------------- I/O edges


def key_project(http: httpx.Client) -> dict[str, Any]:
    r = http.get("/api/v1/auth/key")
    r.raise_for_status()
    return dict(r.json())


def list_meters(http: httpx.Client, project: str) -> list[dict[str, Any]]:
    r = http.get(f"/api/v1/projects/{project}/meters")
    r.raise_for_status()
    return list(r.json())


def create_meter(http: httpx.Client, project: str, event_type: str, *, unit_price_minor: str) -> dict[str, Any]:
    """A SUM meter of ``$.tokens`` for the type and a per-unit price (both audited like any admin change)."""
    slug = "loadgen-" + re.sub(r"[^a-z0-9]+", "-", event_type.lower()).strip("-")[:50]
    r = http.post(f"/api/v1/projects/{project}/meters",
                  json={"slug": slug, "event_type": event_type, "aggregation": "SUM", "value_property": "$.tokens",
                        "name": f"loadgen {event_type}"})
    r.raise_for_status()
    meter = dict(r.json())
    r = http.post(f"/api/v1/projects/{project}/prices",
                  json={"meter": meter["id"], "model": {"model": "per_unit", "unit_price_minor": unit_price_minor}})
    r.raise_for_status()
    return meter


def auto_wallets(project: str, subjects: list[str]) -> list[str]:
    from streams.catalog_model import auto_wallet_id

    return [auto_wallet_id(project, s) for s in subjects]


def ledger_counts(database_url: str, *, project: str, meter_id: str, wallets: list[str]) -> PipelineCounts:
    """What the ledger counted for these wallets under the meter (all periods and price versions)."""
    import psycopg

    from ledger.db import libpq_url

    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        events = conn.execute(
            "SELECT coalesce(sum(events), 0) FROM usage_counters WHERE project_id = %s AND meter_id = %s "
            "AND wallet_id = ANY(%s)", (project, meter_id, wallets)).fetchone()
        charged = conn.execute(
            "SELECT coalesce(sum(charged_minor), 0) FROM usage_charges WHERE project_id = %s AND meter_id = %s "
            "AND wallet_id = ANY(%s)", (project, meter_id, wallets)).fetchone()
    return PipelineCounts(int(events[0]) if events else 0, int(charged[0]) if charged else 0)


class DeadLetterCounter:
    """Counts this run's letters on the DLQ topic, from the letters written since the run started.

    ``offsets_for_times`` finds where the run starts; on the local broker it answers 0 when nothing is later
    (DESIGN §5 d), which only means reading more letters — each is filtered by the run's unique source."""

    def __init__(self, bootstrap: str, topic: str, *, source: str, since_ms: int) -> None:
        from confluent_kafka import TopicPartition

        from ledger.kafka import make_consumer

        self.source = source
        self.count = 0
        self.reasons: dict[str, int] = {}
        self._consumer = make_consumer(bootstrap, f"meterline-loadgen-{uuid.uuid4().hex}",
                                       **{"enable.auto.commit": False, "auto.offset.reset": "earliest"})
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        wanted = [TopicPartition(topic, p, since_ms) for p in partitions]
        starts = self._consumer.offsets_for_times(wanted, timeout=10) if wanted else []
        self._consumer.assign([TopicPartition(topic, tp.partition, max(tp.offset, 0)) for tp in starts])

    def poll(self, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            batch = self._consumer.consume(num_messages=5_000, timeout=0.2)
            if not batch:
                return
            for msg in batch:
                if msg.error() is not None:
                    continue
                try:
                    letter = orjson.loads(msg.value() or b"null")
                except orjson.JSONDecodeError:
                    continue
                event = letter.get("event") if isinstance(letter, dict) else None
                refused = event if isinstance(event, list) else [event]
                if any(isinstance(e, dict) and e.get("source") == self.source for e in refused):
                    self.count += 1
                    reason = str(letter.get("reason"))
                    self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def close(self) -> None:
        self._consumer.close()


def settle(report: LoadgenReport, *, counts: Callable[[], PipelineCounts], baseline: PipelineCounts,
           letters: DeadLetterCounter, settle_s: float) -> LoadgenReport:
    """Poll the pipeline until every accepted event is charged or dead-lettered, or ``settle_s`` passed."""
    deadline = time.monotonic() + settle_s
    while True:
        letters.poll(0.5)
        now = counts()
        report.dead_lettered = letters.count
        report.reasons = dict(letters.reasons)
        report.charged_events = now.charged_events - baseline.charged_events
        report.charged_minor = now.charged_minor - baseline.charged_minor
        report.settled = report.unaccounted <= 0
        if report.settled or time.monotonic() >= deadline:
            return report
        time.sleep(0.5)
