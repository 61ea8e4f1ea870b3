"""Analytics errors: a small hierarchy with stable codes (the api maps codes to HTTP statuses)."""

from __future__ import annotations


class AnalyticsError(RuntimeError):
    code = "analytics.error"


class BadQuery(AnalyticsError):
    """A request the query builders refuse (bad window, unknown granularity, too many buckets...)."""

    code = "analytics.bad_query"


class NotConfigured(AnalyticsError):
    """No ClickHouse URL, or this process does not own the embedded engine."""

    code = "analytics.unavailable"


class SchemaError(AnalyticsError):
    code = "analytics.schema"
