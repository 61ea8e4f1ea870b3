"""Run a component's Alembic migrations programmatically.

Each component that owns PostgreSQL tables keeps its own Alembic script directory and its own version
table (``alembic_version_<component>``), so the components' schemas evolve independently while living in
one database. This is the one runner they all share."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ledger.db import make_engine, sqlalchemy_url


def _config(database_url: str, script_location: Path, version_table: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    cfg.attributes["version_table"] = version_table
    return cfg


def upgrade(database_url: str, *, script_location: Path, version_table: str) -> None:
    command.upgrade(_config(database_url, script_location, version_table), "head")


def pending(database_url: str, *, script_location: Path, version_table: str) -> list[str]:
    """Revisions not yet applied (empty when the schema is current). Used by start-up checks."""
    cfg = _config(database_url, script_location, version_table)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()
    finally:
        engine.dispose()
    return [] if current == head else [f"{current or 'empty'} -> {head}"]


def run_env() -> None:
    """Body of every component's ``migrations/env.py``: online mode, version table from attributes."""
    from alembic import context
    from sqlalchemy import engine_from_config, pool

    config = context.config
    connectable = engine_from_config(
        config.get_section(config.config_ini_section) or {}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            version_table=config.attributes.get("version_table", "alembic_version"),
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
