"""Erasure-tolerant chain (chain v2) and retired wallets.

Revision ID: ledger_0013
Revises: ledger_0012
Create Date: 2026-12-10

1. ``transactions.metadata_salt`` / ``metadata_commitment``: from now on the chain covers a salted commitment
   to the metadata, ``sha256(salt || metadata::text)``, instead of the metadata itself (the BEFORE INSERT trigger
   draws 16 random bytes and computes it). Account erasure may then replace the personal values in an erased
   wallet's metadata with their keyed pseudonym and drop the salt: the chain still verifies (it never saw the
   metadata), every amount, balance, key and reference stays covered by the hash, and without the salt the
   commitment reveals nothing about what was there. Rows posted before this migration (commitment NULL) keep
   chain v1 (metadata in the chain) and are never rewritten: their chain heads may already be pinned.
2. ``ledger_erasure_pseudonymise_metadata(wallet, from[], to[])``: the only way to change a transaction row.
   SECURITY DEFINER (owned by the migration owner; EXECUTE granted to ``meterline_app`` only), it replaces the
   JSON string values ``from[i]`` by ``to[i]`` in the metadata of the wallet's chain-v2 rows and drops their
   salt. The append-only trigger lets an UPDATE through only inside that function (a transaction-local flag it
   sets and clears) and only when nothing but ``metadata`` and ``metadata_salt`` (to NULL) changed.
3. ``wallets.erased_at``: when account erasure retired the wallet (set by ``ledger.service.retire_wallet``).
   A retired wallet's deterministic id is skipped by auto-provisioning (streams.catalog_model.auto_wallet_id's
   generations), so a returning subject gets a fresh wallet and the old one stays closed.
"""

from alembic import op

revision = "ledger_0013"
down_revision = "ledger_0012"
branch_labels = None
depends_on = None

APP_ROLE = "meterline_app"

PAYLOAD_V2 = """
CREATE OR REPLACE FUNCTION ledger_chain_payload(t transactions) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_array(t.id, t.project_id, t.wallet_id, t.kind, t.amount_minor, t.balance_before_minor,
        t.balance_after_minor, t.idempotency_key, t.request_fingerprint, t.source_ref, t.related_transaction_id,
        t.hold_id, t.meter_id, (extract(epoch FROM t.period_start) * 1000000)::bigint, t.price_version_id,
        t.reason,
        CASE WHEN t.metadata_commitment IS NULL THEN t.metadata
             ELSE to_jsonb('commitment:' || encode(t.metadata_commitment, 'hex')) END,
        (extract(epoch FROM t.created_at) * 1000000)::bigint)::text
$$;
"""

LINK_V2 = r"""
CREATE OR REPLACE FUNCTION ledger_chain_link() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    NEW.metadata_salt := uuid_send(gen_random_uuid());
    NEW.metadata_commitment := sha256(NEW.metadata_salt
                                      || convert_to(coalesce(NEW.metadata::text, 'null'), 'UTF8'));
    SELECT chain_hash INTO previous FROM transactions
    WHERE wallet_id = NEW.wallet_id AND id < NEW.id ORDER BY id DESC LIMIT 1;
    NEW.chain_hash := sha256(coalesce(previous, '\x'::bytea) || convert_to(ledger_chain_payload(NEW), 'UTF8'));
    RETURN NEW;
END $$;
"""

GUARD = """
CREATE OR REPLACE FUNCTION ledger_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- the one exception: erasure's pseudonymisation of a chain-v2 row's metadata, inside
    -- ledger_erasure_pseudonymise_metadata (which sets the flag), changing nothing else
    -- nested: PL/pgSQL does not promise to short-circuit AND, and OLD of another table (or of a statement-level
    -- trigger) has no metadata_commitment
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'transactions' AND TG_LEVEL = 'ROW' THEN
        IF current_setting('meterline.erasure_path', true) = 'ledger_erasure_pseudonymise_metadata'
           AND OLD.metadata_commitment IS NOT NULL AND NEW.metadata_salt IS NULL
           AND (to_jsonb(NEW) - 'metadata' - 'metadata_salt') = (to_jsonb(OLD) - 'metadata' - 'metadata_salt') THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'ledger: % on % is refused: the ledger is append-only (post a compensating transaction)',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
"""

PSEUDONYMISE = f"""
CREATE FUNCTION ledger_erasure_pseudonymise_metadata(p_wallet text, p_from text[], p_to text[])
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    changed integer := 0;
    n integer;
    i integer;
BEGIN
    IF coalesce(array_length(p_from, 1), 0) <> coalesce(array_length(p_to, 1), 0) THEN
        RAISE EXCEPTION 'ledger_erasure_pseudonymise_metadata: from and to differ in length';
    END IF;
    PERFORM set_config('meterline.erasure_path', 'ledger_erasure_pseudonymise_metadata', true);
    FOR i IN 1 .. coalesce(array_length(p_from, 1), 0) LOOP
        -- whole JSON string values (and keys) equal to the personal value: its JSON text, quotes included
        UPDATE transactions
        SET metadata = replace(metadata::text, to_json(p_from[i])::text, to_json(p_to[i])::text)::jsonb,
            metadata_salt = NULL
        WHERE wallet_id = p_wallet AND metadata_commitment IS NOT NULL
          AND strpos(metadata::text, to_json(p_from[i])::text) > 0;
        GET DIAGNOSTICS n = ROW_COUNT;
        changed := changed + n;
    END LOOP;
    PERFORM set_config('meterline.erasure_path', '', true);
    RETURN changed;
END $$;
REVOKE ALL ON FUNCTION ledger_erasure_pseudonymise_metadata(text, text[], text[]) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        GRANT EXECUTE ON FUNCTION ledger_erasure_pseudonymise_metadata(text, text[], text[]) TO {APP_ROLE};
    END IF;
END $$;
"""

PAYLOAD_V1 = """
CREATE OR REPLACE FUNCTION ledger_chain_payload(t transactions) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_array(t.id, t.project_id, t.wallet_id, t.kind, t.amount_minor, t.balance_before_minor,
        t.balance_after_minor, t.idempotency_key, t.request_fingerprint, t.source_ref, t.related_transaction_id,
        t.hold_id, t.meter_id, (extract(epoch FROM t.period_start) * 1000000)::bigint, t.price_version_id,
        t.reason, t.metadata, (extract(epoch FROM t.created_at) * 1000000)::bigint)::text
$$;
"""

LINK_V1 = r"""
CREATE OR REPLACE FUNCTION ledger_chain_link() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    SELECT chain_hash INTO previous FROM transactions
    WHERE wallet_id = NEW.wallet_id AND id < NEW.id ORDER BY id DESC LIMIT 1;
    NEW.chain_hash := sha256(coalesce(previous, '\x'::bytea) || convert_to(ledger_chain_payload(NEW), 'UTF8'));
    RETURN NEW;
END $$;
"""

GUARD_V1 = """
CREATE OR REPLACE FUNCTION ledger_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger: % on % is refused: the ledger is append-only (post a compensating transaction)',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
"""


def upgrade() -> None:
    op.execute("ALTER TABLE transactions ADD COLUMN metadata_salt bytea, ADD COLUMN metadata_commitment bytea")
    op.execute("ALTER TABLE wallets ADD COLUMN erased_at timestamptz")
    op.execute("CREATE INDEX wallets_erased ON wallets (project_id, id) WHERE erased_at IS NOT NULL")
    op.execute(PAYLOAD_V2)
    op.execute(LINK_V2)
    op.execute(GUARD)
    op.execute(PSEUDONYMISE)


def downgrade() -> None:
    op.execute("DROP FUNCTION ledger_erasure_pseudonymise_metadata(text, text[], text[])")
    op.execute(GUARD_V1)
    op.execute("DROP INDEX wallets_erased")
    op.execute("ALTER TABLE wallets DROP COLUMN erased_at")
    # chain-v2 rows cannot go back to v1 without re-chaining: refuse rather than break verification silently
    op.execute("""DO $$ BEGIN IF EXISTS (SELECT FROM transactions WHERE metadata_commitment IS NOT NULL) THEN
        RAISE EXCEPTION 'ledger_0013 downgrade: chain-v2 transactions exist'; END IF; END $$""")
    op.execute(LINK_V1)
    op.execute(PAYLOAD_V1)
    op.execute("ALTER TABLE transactions DROP COLUMN metadata_salt, DROP COLUMN metadata_commitment")
