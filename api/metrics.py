"""Prometheus metrics of the api process, served at ``GET /metrics`` on the API's own port (api/health.py).

The api process's registry also holds ``ledger``'s metrics it records (none on the hot path) and, with embedded
ClickHouse, the analytics sink's (analytics/metrics.py) and its consumer lag, because the sink runs in this process.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["DEBIT_SECONDS", "INGEST_ACCEPTED", "INGEST_REJECTED", "WEBHOOKS"]

INGEST_ACCEPTED = Counter("meterline_ingest_events_accepted_total",
                          "Usage events the ingest API accepted (acknowledged by the broker before the answer)")
INGEST_REJECTED = Counter("meterline_ingest_events_rejected_total",
                          "Usage events the ingest API refused, by reason (a validation reason, or unavailable / "
                          "overloaded when the broker did not acknowledge them and the request answered 503)",
                          ["reason"])
WEBHOOKS = Counter("meterline_webhook_deliveries_total",
                   "Payment provider webhook deliveries by provider and outcome (processed, ignored, unmatched, "
                   "deferred, duplicate, rejected = forged/malformed 400, failed = 500)", ["provider", "outcome"])
DEBIT_SECONDS = Histogram("meterline_debit_seconds",
                          "Synchronous debit requests (POST …/debit), from the handler's start to its answer, by outcome "
                          "(ok, refused = a 4xx such as 402, error)", ["outcome"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
