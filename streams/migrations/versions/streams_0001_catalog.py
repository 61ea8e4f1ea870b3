"""Streams catalog: meters (versioned), prices and immutable price versions, subject keys, project settings.

Revision ID: streams_0001
Revises:
Create Date: 2026-01-01

Invariants the database enforces:
- a meter's history is kept: an update inserts version n+1 and marks version n superseded; one CURRENT
  (not superseded, not archived) meter per (project, slug);
- a price version is immutable (trigger refuses UPDATE/DELETE): a counter records the version it was
  priced with, so that version must mean the same thing forever; one active price per meter;
- a (project, subject) maps to exactly one wallet; a wallet may carry many subject keys.
No foreign keys to api.projects: streams migrates before api (meterline/stack.py order).
"""

from alembic import op

revision = "streams_0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE meters (
    row_id          bigserial PRIMARY KEY,
    id              text NOT NULL,                -- stable across versions; counters use it
    version         integer NOT NULL CHECK (version >= 1),
    project_id      text NOT NULL,
    slug            text NOT NULL,
    name            text,
    description     text,
    event_type      text NOT NULL,
    aggregation     text NOT NULL CHECK (aggregation IN ('SUM', 'COUNT', 'MAX', 'UNIQUE_COUNT', 'LATEST')),
    value_property  text,                         -- JSON path inside the event's data; NULL only for COUNT
    filters         jsonb NOT NULL DEFAULT '[]',  -- [{"property": "$.model", "equals": x} | {"property", "in": [..]}]
    group_by        jsonb NOT NULL DEFAULT '[]',  -- dimension paths for analytics (not part of charging)
    created_at      timestamptz NOT NULL DEFAULT now(),
    superseded_at   timestamptz,
    archived_at     timestamptz,
    UNIQUE (id, version),
    CONSTRAINT count_needs_no_value CHECK (aggregation = 'COUNT' OR value_property IS NOT NULL)
);
CREATE UNIQUE INDEX meters_current_slug ON meters (project_id, slug)
    WHERE superseded_at IS NULL AND archived_at IS NULL;
CREATE UNIQUE INDEX meters_one_current_version ON meters (id) WHERE superseded_at IS NULL;
CREATE INDEX meters_project ON meters (project_id, event_type) WHERE superseded_at IS NULL;

CREATE TABLE prices (
    id           text PRIMARY KEY,
    project_id   text NOT NULL,
    meter_id     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    archived_at  timestamptz
);
CREATE UNIQUE INDEX prices_one_active_per_meter ON prices (meter_id) WHERE archived_at IS NULL;
CREATE INDEX prices_project ON prices (project_id);

CREATE TABLE price_versions (
    id              text PRIMARY KEY,
    price_id        text NOT NULL REFERENCES prices (id),
    version         integer NOT NULL CHECK (version >= 1),
    model           jsonb NOT NULL,               -- ledger.contracts.PriceModel
    period          text NOT NULL CHECK (period IN ('month', 'day')),
    effective_from  timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (price_id, version)
);

CREATE FUNCTION streams_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'streams: % on % is refused: price versions are immutable (add a new version)',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER price_versions_immutable BEFORE UPDATE OR DELETE ON price_versions
    FOR EACH ROW EXECUTE FUNCTION streams_refuse_mutation();

CREATE TABLE subject_keys (
    project_id  text NOT NULL,
    subject     text NOT NULL,
    wallet_id   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, subject)
);
CREATE INDEX subject_keys_wallet ON subject_keys (wallet_id);

CREATE TABLE project_settings (
    project_id          text PRIMARY KEY,
    unknown_subjects    text NOT NULL DEFAULT 'auto_provision'
                        CHECK (unknown_subjects IN ('auto_provision', 'dead_letter')),
    allowed_lateness_s  integer NOT NULL DEFAULT 3600 CHECK (allowed_lateness_s >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- deletions leave no row behind, so the worker's cheap "did the catalog change?" probe counts them here
CREATE TABLE catalog_revision (
    id          smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    revision    bigint NOT NULL DEFAULT 0,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO catalog_revision DEFAULT VALUES;

CREATE FUNCTION streams_bump_catalog_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_revision SET revision = revision + 1, changed_at = now() WHERE id = 1;
    RETURN NULL;
END $$;
CREATE TRIGGER meters_changed AFTER INSERT OR UPDATE OR DELETE ON meters
    FOR EACH STATEMENT EXECUTE FUNCTION streams_bump_catalog_revision();
CREATE TRIGGER prices_changed AFTER INSERT OR UPDATE OR DELETE ON prices
    FOR EACH STATEMENT EXECUTE FUNCTION streams_bump_catalog_revision();
CREATE TRIGGER price_versions_changed AFTER INSERT ON price_versions
    FOR EACH STATEMENT EXECUTE FUNCTION streams_bump_catalog_revision();
CREATE TRIGGER subject_keys_changed AFTER INSERT OR UPDATE OR DELETE ON subject_keys
    FOR EACH STATEMENT EXECUTE FUNCTION streams_bump_catalog_revision();
CREATE TRIGGER project_settings_changed AFTER INSERT OR UPDATE OR DELETE ON project_settings
    FOR EACH STATEMENT EXECUTE FUNCTION streams_bump_catalog_revision();
"""

DOWNGRADE = """
DROP TABLE IF EXISTS catalog_revision, project_settings, subject_keys, price_versions, prices, meters CASCADE;
DROP FUNCTION IF EXISTS streams_bump_catalog_revision();
DROP FUNCTION IF EXISTS streams_refuse_mutation();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
