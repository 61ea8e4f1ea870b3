"""A wallet can be closed: ``wallets.closed_at``.

Revision ID: ledger_0005
Revises: ledger_0004
Create Date: 2026-12-01

A closed wallet refuses new synchronous debits, reservations, grants and refunds (``ledger.wallet_closed``,
checked under the wallet lock like the floor); usage that already happened is still posted by checkpoints
(DESIGN §2.1/§2.4: never dropped), and operator adjustments (e.g. the forfeiture of an erased account's balance)
still post. The API closes a wallet when its end user's account erasure is requested (api/wallets/erasure.py) and
reopens it when the erasure is cancelled within the grace period. NULL = open (every existing wallet).
"""

from alembic import op

revision = "ledger_0005"
down_revision = "ledger_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE wallets ADD COLUMN closed_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE wallets DROP COLUMN closed_at")
