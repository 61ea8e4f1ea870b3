"""API schema: account erasure requests (app-store account deletion) — close now, erase after a grace period.

Revision ID: api_0007
Revises: api_0006
Create Date: 2026-12-01

One row per request. ``pending``: the wallet is closed (ledger ``wallets.closed_at``), its subject keys are taken
out of ``subject_keys`` and kept in ``subject_keys_held`` so a cancel can put them back; ``erase_after`` = request
time + ``API_ERASURE_GRACE_S``. ``cancelled``: reopened within the grace. ``erased``: the scheduler's
``erase_accounts`` job replaced the owner reference with ``tombstone``, dropped every subject key of the wallet,
cleared ``subject_keys_held`` and forfeited the balance (``forfeit_transaction_id``). Final.

Invariants: at most one live (pending or erased) request per wallet (partial unique index); an erased row keeps no
subject (CHECK); a cancelled or erased request never goes back to pending.
"""

from alembic import op

revision = "api_0007"
down_revision = "api_0006"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE wallet_erasures (
    id                      bigserial PRIMARY KEY,
    project_id              text NOT NULL REFERENCES projects (id),
    wallet_id               text NOT NULL,
    status                  text NOT NULL CHECK (status IN ('pending', 'cancelled', 'erased')),
    reason                  text CHECK (length(reason) <= 500),
    subject_keys_held       jsonb,
    requested_at            timestamptz NOT NULL DEFAULT now(),
    erase_after             timestamptz NOT NULL,
    cancelled_at            timestamptz,
    erased_at               timestamptz,
    tombstone               text,
    forfeited_minor         bigint,
    forfeit_transaction_id  bigint,
    CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
    CHECK ((status = 'erased') = (erased_at IS NOT NULL AND tombstone IS NOT NULL)),
    CHECK (status <> 'erased' OR subject_keys_held IS NULL)
);
CREATE UNIQUE INDEX wallet_erasures_one_live ON wallet_erasures (wallet_id) WHERE status IN ('pending', 'erased');
CREATE INDEX wallet_erasures_due ON wallet_erasures (erase_after) WHERE status = 'pending';
CREATE INDEX wallet_erasures_project ON wallet_erasures (project_id, requested_at);
"""

DOWNGRADE = """
DROP TABLE wallet_erasures;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
