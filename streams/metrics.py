"""Prometheus metrics of a streams worker (served at ``/metrics`` on ``STREAMS_METRICS_PORT``, ledger/probes.py).

Consumer lag of ``usage.events.v1`` is the shared ``meterline_consumer_lag_messages`` (ledger/metrics.py, where
its meaning on this broker is written down), labelled with the worker's group; a worker reports the partitions
it owns and has seeded: high watermark of its latest fetch − (``processed_through`` + 1).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from streams.metering import Stats

__all__ = ["BATCH_SECONDS", "CHECKPOINTS_EMITTED", "DEAD_LETTERS", "EVENTS", "EVENT_NOTES", "MESSAGES", "PARTITIONS",
           "export_outcomes"]

DEAD_LETTERS = Counter("meterline_dead_letters_total",
                       "Events sent to usage.events.dlq.v1 by this worker, by reason (since the worker started)",
                       ["reason"])
MESSAGES = Counter("meterline_streams_messages_total", "Kafka messages of usage.events.v1 taken in batches")
CHECKPOINTS_EMITTED = Counter("meterline_streams_checkpoints_total",
                              "ChargeCheckpoints sent to ledger.charges.v1 (acknowledged before the batch ends)")
BATCH_SECONDS = Histogram("meterline_streams_batch_seconds",
                          "One take_events batch: metering plus waiting for the broker to acknowledge its checkpoints",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
PARTITIONS = Gauge("meterline_streams_partitions", "Partitions of usage.events.v1 this worker owns, by state",
                   ["state"])

#: every metered event has exactly one outcome (they add up to the events taken): ``accepted`` (counted on at least
#: one priced meter), ``duplicate`` (its identity was seen within the dedupe horizon), ``rejected`` (dead-lettered)
#: and ``unmetered`` (accepted but charged nothing: no meter filter matched, or none of its meters has a price)
EVENTS = Counter("meterline_streams_events_total",
                 "Events metered by this worker, by outcome: accepted, duplicate, rejected, unmetered", ["outcome"])
#: what may be true of an event beside its outcome, each counted once per event (``unpriced`` once per meter)
EVENT_NOTES = Counter("meterline_streams_event_notes_total",
                      "Metered events that were late (charged in the current period), misplaced (not in their "
                      "subject's murmur2 partition: a duplicate in another partition is not caught), or met a meter "
                      "without an active price (unpriced: that meter charged nothing)", ["note"])

_OUTCOMES = (("accepted", "accepted"), ("duplicates", "duplicate"), ("rejected", "rejected"),
             ("unmetered", "unmetered"))
_NOTES = (("late", "late"), ("misplaced", "misplaced"), ("unpriced", "unpriced"))


def export_outcomes(now: Stats, before: Stats | None) -> None:
    """Add what an aggregator counted since ``before`` (None: since it was created) to the counters."""
    for field, label in _OUTCOMES:
        delta = getattr(now, field) - (getattr(before, field) if before is not None else 0)
        if delta > 0:
            EVENTS.labels(label).inc(delta)
    for field, label in _NOTES:
        delta = getattr(now, field) - (getattr(before, field) if before is not None else 0)
        if delta > 0:
            EVENT_NOTES.labels(label).inc(delta)
