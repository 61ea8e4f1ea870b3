"""The database enforces append-only itself (issue 13 item 9): the application role — what api, streams, ledger
and scheduler connect as — can only INSERT and SELECT on the append-only tables, cannot disable their triggers,
and can still do all of the ledger's work. On cbf7ba4 every process connected as the owner (the superuser in the
embedded stack), which could disable the triggers and rewrite transactions."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy import text

from ledger import queries, service
from ledger.checkpoints import apply_checkpoint
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.db import libpq_url, make_engine
from meterline.services import APP_ROLE, app_database_url

pytestmark = pytest.mark.integration

APPEND_ONLY = ("transactions", "transaction_allocations", "audit_log", "access_decisions", "price_versions")


def test_the_app_role_does_the_ledgers_work_but_cannot_rewrite_history(database_url: str) -> None:
    app_url = app_database_url(database_url)
    assert f"//{APP_ROLE}" in app_url
    engine = make_engine(app_url, pool_size=1)
    try:  # everything a process does, as the app role
        with engine.begin() as conn:
            assert conn.execute(text("SELECT current_user")).scalar() == APP_ROLE
            wallet = service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="u").id
            service.grant_credits(conn, wallet_id=wallet, amount_minor=100, idempotency_key="g1")
            apply_checkpoint(conn, ChargeCheckpoint(
                source_topic="usage.events.v1", partition=0, as_of_offset=5, emitted_at=datetime.now(UTC),
                counters=[CounterValue(key=CounterKey(wallet_id=wallet, project_id="p1", meter_id="m",
                                                      period_start=datetime(2026, 12, 1, tzinfo=UTC),
                                                      price_version_id="v1"),
                                       units=Decimal(30), price=PriceModel(model="per_unit", unit_price_minor=1),
                                       events=3)]))
            assert queries.get_balance(conn, wallet).balance_minor == 70  # type: ignore[union-attr]
            conn.execute(text("DELETE FROM outbox WHERE published_at IS NOT NULL"))  # working tables: allowed
    finally:
        engine.dispose()
    with psycopg.connect(libpq_url(app_url), autocommit=True) as conn:
        for table in APPEND_ONLY:
            for statement in (f"UPDATE {table} SET created_at = created_at" if table != "transaction_allocations"
                              else f"UPDATE {table} SET amount_minor = amount_minor",
                              f"DELETE FROM {table}", f"TRUNCATE {table}",
                              f"ALTER TABLE {table} DISABLE TRIGGER USER"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # nor pretend a migration ran
            conn.execute("DELETE FROM alembic_version_ledger")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET session_replication_role = replica")  # the other way around triggers
