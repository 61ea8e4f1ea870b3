"""Price versions continue a period's units; dedupe keys carry their stream time.

Revision ID: ledger_0006
Revises: ledger_0011
Create Date: 2026-12-03

Issue 13 items 4–6, DESIGN §2 invariants 9 and 10.

- ``usage_charges.meter_version`` and ``usage_charges.price_effective_from``: the keys of one (wallet, meter,
  period, meter_version) whose price versions took effect one after another are priced as ONE run of units —
  each version prices its units at the tier position the earlier versions' units left (ledger/checkpoints.py).
  Rows written before this revision keep NULL and stay priced on their own: their charges are history.
  ``usage_charge_groups`` holds one row per such group: appliers lock it (in key order, before any usage_charges
  row) so two partitions' appliers of one group serialise and each sees the versions the other added.
- ``dedupe_key_sets.arrived_at``: the newest arrival (Kafka timestamp, stream time) the partition had seen when
  the checkpoint was cut. Seeding measures the dedupe horizon against it, not the wall clock, and keeps the
  newest keys (ORDER BY arrival DESC LIMIT n). NULL for older rows (readers fall back to ``seen_at``).
"""

from alembic import op

revision = "ledger_0006"
down_revision = "ledger_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE usage_charges ADD COLUMN meter_version integer NOT NULL DEFAULT 1 CHECK (meter_version >= 1);
ALTER TABLE usage_charges ADD COLUMN price_effective_from timestamptz;
CREATE TABLE usage_charge_groups (
    wallet_id      text NOT NULL,
    meter_id       text NOT NULL,
    period_start   timestamptz NOT NULL,
    meter_version  integer NOT NULL,
    PRIMARY KEY (wallet_id, meter_id, period_start, meter_version)
);
ALTER TABLE dedupe_key_sets ADD COLUMN arrived_at timestamptz;
CREATE INDEX dedupe_key_sets_stream_time ON dedupe_key_sets (partition, (coalesce(arrived_at, seen_at)) DESC);
""")


def downgrade() -> None:
    op.execute("""
DROP INDEX IF EXISTS dedupe_key_sets_stream_time;
DROP TABLE IF EXISTS usage_charge_groups;
ALTER TABLE dedupe_key_sets DROP COLUMN arrived_at;
ALTER TABLE usage_charges DROP COLUMN price_effective_from;
ALTER TABLE usage_charges DROP COLUMN meter_version;
""")
