"""Errors of the streams component, each with a stable ``code`` (api/errors.py maps codes to HTTP)."""

from __future__ import annotations


class StreamsError(Exception):
    code = "streams.error"


class CatalogInvalid(StreamsError):
    """A meter, price or setting that cannot work (bad JSON path, unknown aggregation, ...)."""

    code = "streams.invalid"


class CatalogNotFound(StreamsError):
    code = "streams.not_found"


class CatalogConflict(StreamsError):
    """Another current meter has the slug, the meter already has an active price, the subject is mapped..."""

    code = "streams.conflict"


class PendingMigrations(StreamsError):
    code = "streams.pending_migrations"


class LedgerNotCaughtUp(StreamsError):
    code = "streams.ledger_not_caught_up"
