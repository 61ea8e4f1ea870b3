"""Account erasure reaches the append-only tables, and ClickHouse through a queue.

Revision ID: api_0017
Revises: api_0016
Create Date: 2026-12-10

1. ``api_erasure_pseudonymise(project, from[], to[])``: the only way to change a row of the append-only
   ``audit_log`` and ``access_decisions``. SECURITY DEFINER (owned by the migration owner, EXECUTE for
   ``meterline_app`` only; the app itself has no UPDATE on these tables), it replaces each personal value
   ``from[i]`` by its keyed pseudonym ``to[i]`` (api/wallets/pseudonyms.py): in ``access_decisions.subject``, in
   ``audit_log.target_id`` and as a whole JSON string value in ``audit_log.before`` / ``after``. The
   append-only triggers let an UPDATE through only inside this function (a transaction-local flag it sets and
   clears) and only when no other column changed; DELETE and TRUNCATE stay refused. It writes one
   ``erasure.pseudonymise`` audit entry per call with the counts (never a value).
2. ``wallet_erasures.analytics_pending`` ([[subject, pseudonym], …]) and ``analytics_erased_at``: what the
   ClickHouse pass still has to rewrite (api/wallets/erasure_analytics.py). The pairs are kept only until that
   pass ran (it clears them), like ``subject_keys_held`` is kept only during the grace.
"""

from alembic import op

revision = "api_0017"
down_revision = "api_0016"
branch_labels = None
depends_on = None

APP_ROLE = "meterline_app"

UPGRADE = f"""
ALTER TABLE wallet_erasures ADD COLUMN analytics_pending jsonb, ADD COLUMN analytics_erased_at timestamptz;
CREATE INDEX wallet_erasures_analytics_pending ON wallet_erasures (id) WHERE analytics_pending IS NOT NULL;

CREATE OR REPLACE FUNCTION api_audit_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_LEVEL = 'ROW'
       AND current_setting('meterline.erasure_path', true) = 'api_erasure_pseudonymise'
       AND (to_jsonb(NEW) - 'before' - 'after' - 'target_id') = (to_jsonb(OLD) - 'before' - 'after' - 'target_id')
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'api: % on % is refused: the audit log is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE OR REPLACE FUNCTION api_access_decisions_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_LEVEL = 'ROW'
       AND current_setting('meterline.erasure_path', true) = 'api_erasure_pseudonymise'
       AND (to_jsonb(NEW) - 'subject') = (to_jsonb(OLD) - 'subject') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'api: % on % is refused: access decisions are append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE FUNCTION api_erasure_pseudonymise(p_project text, p_from text[], p_to text[])
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    audit_rows integer := 0;
    decision_rows integer := 0;
    n integer;
    i integer;
    token text;
BEGIN
    IF coalesce(array_length(p_from, 1), 0) <> coalesce(array_length(p_to, 1), 0) THEN
        RAISE EXCEPTION 'api_erasure_pseudonymise: from and to differ in length';
    END IF;
    PERFORM set_config('meterline.erasure_path', 'api_erasure_pseudonymise', true);
    FOR i IN 1 .. coalesce(array_length(p_from, 1), 0) LOOP
        token := to_json(p_from[i])::text;  -- the value as a whole JSON string, quotes included
        UPDATE access_decisions SET subject = p_to[i] WHERE project_id = p_project AND subject = p_from[i];
        GET DIAGNOSTICS n = ROW_COUNT;
        decision_rows := decision_rows + n;
        UPDATE audit_log
        SET target_id = CASE WHEN target_id = p_from[i] THEN p_to[i] ELSE target_id END,
            before = replace(before::text, token, to_json(p_to[i])::text)::jsonb,
            after = replace(after::text, token, to_json(p_to[i])::text)::jsonb
        WHERE project_id = p_project
          AND (target_id = p_from[i] OR strpos(before::text, token) > 0 OR strpos(after::text, token) > 0);
        GET DIAGNOSTICS n = ROW_COUNT;
        audit_rows := audit_rows + n;
    END LOOP;
    PERFORM set_config('meterline.erasure_path', '', true);
    INSERT INTO audit_log (project_id, actor_kind, action, target_kind, target_id, after)
    VALUES (p_project, 'system', 'erasure.pseudonymise', 'project', p_project,
            jsonb_build_object('values', coalesce(array_length(p_from, 1), 0), 'audit_rows', audit_rows,
                               'access_decision_rows', decision_rows));
    RETURN jsonb_build_object('audit_rows', audit_rows, 'access_decision_rows', decision_rows);
END $$;
REVOKE ALL ON FUNCTION api_erasure_pseudonymise(text, text[], text[]) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        GRANT EXECUTE ON FUNCTION api_erasure_pseudonymise(text, text[], text[]) TO {APP_ROLE};
    END IF;
END $$;
"""

DOWNGRADE = """
DROP FUNCTION IF EXISTS api_erasure_pseudonymise(text, text[], text[]);
CREATE OR REPLACE FUNCTION api_audit_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'api: % on % is refused: the audit log is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE OR REPLACE FUNCTION api_access_decisions_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'api: % on % is refused: access decisions are append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;
DROP INDEX IF EXISTS wallet_erasures_analytics_pending;
ALTER TABLE wallet_erasures DROP COLUMN analytics_pending, DROP COLUMN analytics_erased_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
