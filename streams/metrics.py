"""Prometheus metrics of a streams worker (served at ``/metrics`` on ``STREAMS_METRICS_PORT``, ledger/probes.py).

Consumer lag of ``usage.events.v1`` is the shared ``meterline_consumer_lag_messages`` (ledger/metrics.py, where
its meaning on this broker is written down), labelled with the worker's group; a worker reports the partitions
it owns and has seeded: high watermark of its latest fetch − (``processed_through`` + 1).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BATCH_SECONDS", "CHECKPOINTS_EMITTED", "DEAD_LETTERS", "MESSAGES", "PARTITIONS"]

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
