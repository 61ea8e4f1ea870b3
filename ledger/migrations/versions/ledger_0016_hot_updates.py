"""Updates in place: room on each page, and no index whose predicate moves with every charge.

Revision ID: ledger_0016
Revises: ledger_0015
Create Date: 2026-12-07

A checkpoint rewrites, per key, its counter row, its group row, its charge row and its wallet row. PostgreSQL can
update a row without touching its indexes (a HOT update) only when no indexed column changes and the new version
fits on the same page. Two things prevented that (measured in pg_stat_user_tables during `bench.ledger_apply`:
8% of usage_charges updates and 17% of wallets updates were HOT):

* ``usage_charges_unsettled`` (ledger_0015) was partial on ``charged_minor <> posted_minor``: a column of an index
  predicate counts as indexed, so every update that moved a charge — all of them — wrote new entries into both of
  the table's indexes. The index is now partial on ``unsettled``, a stored generated column
  (``charged_minor <> posted_minor``) that changes only when a key starts or stops waiting for the settle pass;
  the database computes it, so it cannot disagree with the two amounts.
* pages were filled to 100% by inserts: ``fillfactor = 80`` leaves a fifth of each new page for the next versions
  of its rows (existing pages keep their layout until they are rewritten).

Adding a stored generated column rewrites ``usage_charges`` once (an exclusive lock for the duration).
"""

from alembic import op

revision = "ledger_0016"
down_revision = "ledger_0015"
branch_labels = None
depends_on = None

#: the tables whose rows every checkpoint rewrites
_REWRITTEN_PER_KEY = ("usage_charges", "usage_counters", "usage_charge_groups", "wallets")


def upgrade() -> None:
    op.execute("DROP INDEX usage_charges_unsettled")
    op.execute("ALTER TABLE usage_charges ADD COLUMN unsettled boolean "
               "GENERATED ALWAYS AS (charged_minor <> posted_minor) STORED")
    op.execute("CREATE INDEX usage_charges_unsettled ON usage_charges (wallet_id, meter_id, period_start, "
               "price_version_id) WHERE unsettled")
    for table in _REWRITTEN_PER_KEY:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 80)")


def downgrade() -> None:
    for table in _REWRITTEN_PER_KEY:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
    op.execute("DROP INDEX usage_charges_unsettled")
    op.execute("ALTER TABLE usage_charges DROP COLUMN unsettled")
    op.execute("CREATE INDEX usage_charges_unsettled ON usage_charges (wallet_id, meter_id, period_start, "
               "price_version_id) WHERE charged_minor <> posted_minor")
