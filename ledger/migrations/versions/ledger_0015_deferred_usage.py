"""Usage that is priced at once and posted later: ``usage_charges.posted_minor`` and ``wallets.unsettled_minor``.

Revision ID: ledger_0015
Revises: ledger_0014
Create Date: 2026-12-07

With ``LEDGER_USAGE_SETTLE_INTERVAL_S`` > 0 the checkpoint path prices usage (``charged_minor``) and adds the
change to the wallet's ``unsettled_minor`` instead of posting a transaction; a settle pass (ledger/settle.py) posts
``charged_minor − posted_minor`` per key later, one transaction per key however many checkpoints moved it.

* ``usage_charges.posted_minor`` — what the key's usage transactions add up to. Rows written before this revision
  were posted in their checkpoint's transaction: posted = charged.
* ``usage_charges.settlements`` — how many settle passes posted the key (names each posting: unique per key).
* ``wallets.unsettled_minor`` — Σ (charged − posted) over the wallet's keys; counted against what is available.
* a partial index on the keys with something to settle (empty when usage posts at once).
"""

from alembic import op

revision = "ledger_0015"
down_revision = "ledger_0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE usage_charges ADD COLUMN posted_minor bigint, "
               "ADD COLUMN settlements integer NOT NULL DEFAULT 0")
    op.execute("UPDATE usage_charges SET posted_minor = charged_minor")
    op.execute("ALTER TABLE usage_charges ALTER COLUMN posted_minor SET NOT NULL, "
               "ALTER COLUMN posted_minor SET DEFAULT 0")
    op.execute("CREATE INDEX usage_charges_unsettled ON usage_charges (wallet_id, meter_id, period_start, "
               "price_version_id) WHERE charged_minor <> posted_minor")
    op.execute("ALTER TABLE wallets ADD COLUMN unsettled_minor bigint NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE wallets DROP COLUMN unsettled_minor")
    op.execute("DROP INDEX usage_charges_unsettled")
    op.execute("ALTER TABLE usage_charges DROP COLUMN posted_minor, DROP COLUMN settlements")
