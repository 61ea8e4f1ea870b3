"""ledger_0004 moves dedupe keys from one row per event to one array per checkpoint without losing any."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from sqlalchemy import Engine, text

from ledger import queries
from ledger.schema_migrations import _config

MIGRATIONS = Path(__file__).resolve().parents[3] / "ledger" / "migrations"


def _alembic(database_url: str, verb: str, revision: str) -> None:
    cfg = _config(database_url, MIGRATIONS, "alembic_version_ledger")
    getattr(command, verb)(cfg, revision)


def test_per_event_dedupe_rows_survive_the_move_to_arrays_and_back(engine: Engine, database_url: str) -> None:
    _alembic(database_url, "downgrade", "ledger_0003")
    old, new = datetime.now(UTC) - timedelta(days=2), datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO dedupe_keys (source_topic, partition, key_hash, seen_at) VALUES "
                          "('u', 0, 1, :old), ('u', 0, -2, :old), ('u', 0, 3, :new), ('u', 1, 4611686018427387904, :new), "
                          "('u@2', 0, 4, :new)"), {"old": old, "new": new})
    _alembic(database_url, "upgrade", "head")
    with engine.connect() as conn:
        everything = queries.dedupe_keys_since(conn, source_topic="u@2", partitions=[0, 1, 2],
                                               since=old - timedelta(seconds=1))
        recent = queries.dedupe_keys_since(conn, source_topic="u", partitions=[0], since=new - timedelta(seconds=1))
        offsets = conn.execute(text("SELECT as_of_offset FROM dedupe_key_sets ORDER BY 1")).scalars().all()
    assert everything == {0: {1, -2, 3, 4}, 1: {2**62}, 2: set()}  # across topic lives, as before
    assert recent == {0: {3, 4}}  # seen_at kept: the horizon still applies
    assert all(o < 0 for o in offsets)  # migrated sets cannot collide with a real checkpoint's offset
    _alembic(database_url, "downgrade", "ledger_0003")
    with engine.connect() as conn:
        back = conn.execute(text("SELECT source_topic, partition, key_hash FROM dedupe_keys ORDER BY 1, 2, 3")).all()
    assert [tuple(r) for r in back] == [("u", 0, -2), ("u", 0, 1), ("u", 0, 3), ("u", 1, 2**62), ("u@2", 0, 4)]
    _alembic(database_url, "upgrade", "head")
