"""Prometheus metrics of the analytics sink (in ``meterline run analytics`` with a ClickHouse server, or in the api
process when ClickHouse is embedded; served at that process's ``/metrics``).

Its consumer lag is the shared ``meterline_consumer_lag_messages`` (ledger/metrics.py), group
``meterline-analytics``: the high watermark of the latest fetch − the consumer's position (messages handed to the
sink; they are inserted within ``ANALYTICS_BATCH_AGE_MS_MAX``).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["INSERT_SECONDS", "ROWS_INSERTED", "ROWS_REJECTED", "SINK_RESTARTS"]

ROWS_INSERTED = Counter("meterline_analytics_rows_inserted_total", "Rows inserted into ClickHouse, by table",
                        ["table"])
ROWS_REJECTED = Counter("meterline_analytics_rows_rejected_total",
                        "Messages the sink could not turn into rows (logged; usage events are dead-lettered by streams)")
INSERT_SECONDS = Histogram("meterline_analytics_insert_seconds", "One ClickHouse insert of a batch", ["table"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
SINK_RESTARTS = Counter("meterline_analytics_sink_restarts_total",
                        "Times the sink failed (ClickHouse or broker unreachable) and was started again")
