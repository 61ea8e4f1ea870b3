"""Errors of the streams component, each with a stable ``code`` (api/errors.py maps codes to HTTP).

Codes that reach API users name the public concept (``catalog.*``: meters, prices, subject keys), never this
component's name; they are listed in api/README.md ("Error codes") and must not change. The catalog codes
were ``streams.invalid`` / ``streams.not_found`` / ``streams.conflict`` before issue 16."""

from __future__ import annotations


class StreamsError(Exception):
    code = "streams.error"


class CatalogInvalid(StreamsError):
    """A meter, price or setting that cannot work (bad JSON path, unknown aggregation, ...)."""

    code = "catalog.invalid"


class CatalogNotFound(StreamsError):
    code = "catalog.not_found"


class MeterNotFound(CatalogNotFound):
    code = "catalog.meter_not_found"


class PriceNotFound(CatalogNotFound):
    code = "catalog.price_not_found"


class SubjectKeyNotFound(CatalogNotFound):
    code = "catalog.subject_key_not_found"


class WalletNotFound(CatalogNotFound):
    """A subject key names a wallet that is not this project's (or a not-yet-existing UUID that could be
    another project's auto-provisioned id): the same answer either way, so existence elsewhere is not leaked."""

    code = "catalog.wallet_not_found"


class CatalogConflict(StreamsError):
    """Another current meter has the slug, the meter already has an active price, the subject is mapped..."""

    code = "catalog.conflict"


class PendingMigrations(StreamsError):
    code = "streams.pending_migrations"


class LedgerNotCaughtUp(StreamsError):
    code = "streams.ledger_not_caught_up"
