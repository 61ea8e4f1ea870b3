"""The erasure data map: the single source of what account erasure does to every store (docs/erasure.md).

Each ``Entry`` names a store (PostgreSQL table, ClickHouse table, Kafka topic), the columns holding an end user's
personal data and what erasure does to them:

- ``delete``: the rows of the erased subject are deleted;
- ``pseudonymise``: the subject (and its JSON string values) is replaced by its keyed pseudonym
  (api/wallets/pseudonyms.py), so the record and every total per pseudonym stay intact;
- ``tombstone`` / ``clear``: the value is replaced by a random tombstone / NULL;
- ``keep (law)``: financial records kept by law (bookkeeping retention), never rewritten;
- ``keep``: kept on purpose, with the reason (fraud prevention, an operator contract, no subject in it);
- ``expires``: not rewritable in place (a Kafka log, a short-lived row); gone after its retention, which is
  shorter than the erasure grace period;
- ``team``: personal data of a team member (users, invitations), not of an end user: out of this erasure.

``apply`` is the step the ``erase_accounts`` job runs for that entry (api/wallets/erasure.py iterates
``POSTGRES_STEPS`` in order; api/wallets/erasure_analytics.py runs the ClickHouse ones). Tests hold the map to
the schema: every PostgreSQL or ClickHouse column whose name looks personal must be mapped, every actionable
entry has a step, and docs/erasure.md carries ``markdown_table()`` verbatim
(tests/integration/api/wallets/test_erasure_map.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from clickhouse_connect.driver.client import Client
from sqlalchemy import Connection, text

from analytics import erasure as analytics_erasure
from api.wallets.pseudonyms import PREFIX, pseudonym
from ledger import service
from streams import catalog
from streams.errors import CatalogNotFound

Store = Literal["postgres", "clickhouse", "kafka"]
Action = Literal["delete", "pseudonymise", "tombstone", "clear", "keep (law)", "keep", "expires", "team"]
ACTIONABLE: frozenset[str] = frozenset({"delete", "pseudonymise", "tombstone", "clear"})


@dataclass
class ErasureContext:
    """One erasure: the wallet, every subject it had, their pseudonyms, and what each step changed."""

    conn: Connection
    project_id: str
    wallet_id: str
    subjects: list[str]
    pseudonyms: dict[str, str]
    tombstone: str
    key: bytes = field(repr=False)
    counts: dict[str, int] = field(default_factory=dict)


Step = Callable[[ErasureContext], int]
AnalyticsStep = Callable[[Client, str, str, str, str], int]


@dataclass(frozen=True)
class Entry:
    store: Store
    table: str
    columns: tuple[str, ...]
    action: Action
    rows: str  # which rows: the ones of the erased subject / wallet, or "-"
    why: str
    apply: Step | None = field(default=None, compare=False)
    #: a ClickHouse entry's step (analytics/erasure.py): (client, database, project, subject, pseudonym) → rows
    analytics: AnalyticsStep | None = field(default=None, compare=False)
    #: an actionable entry done by another entry's step (``store:table``), e.g. one SQL function for two tables
    covered_by: str | None = None

    @property
    def name(self) -> str:
        return f"{self.store}:{self.table}"


# ----------------------------------------------------------------------------------------- PostgreSQL steps


def _delete_subject_keys(ctx: ErasureContext) -> int:
    mapped = [k.subject for k in catalog.list_subject_keys(ctx.conn, project_id=ctx.project_id,
                                                           wallet_id=ctx.wallet_id, limit=100_000)]
    for subject in mapped:
        with contextlib.suppress(CatalogNotFound):  # rows are locked: only a concurrent delete can race
            catalog.delete_subject_key(ctx.conn, project_id=ctx.project_id, subject=subject)
    return len(mapped)


def _tombstone_owner(ctx: ErasureContext) -> int:
    service.set_owner_ref(ctx.conn, wallet_id=ctx.wallet_id, owner_ref=ctx.tombstone)
    service.retire_wallet(ctx.conn, wallet_id=ctx.wallet_id)  # its id is never auto-provisioned again
    catalog.bump_revision(ctx.conn)  # workers reload: the subject's next generation is a fresh wallet
    return 1


def _clear_ip_network(ctx: ErasureContext) -> int:
    return ctx.conn.execute(text(
        "UPDATE signup_bonus_grants SET ip_network = NULL WHERE project_id = :p AND wallet_id = :w "
        "AND ip_network IS NOT NULL"), {"p": ctx.project_id, "w": ctx.wallet_id}).rowcount


def _delete_ingested_events(ctx: ErasureContext) -> int:
    return ctx.conn.execute(text(
        "DELETE FROM ingested_events WHERE project_id = :p AND subject = ANY(CAST(:s AS text[]))"),
        {"p": ctx.project_id, "s": sorted(ctx.subjects)}).rowcount


def _delete_backfill_events(ctx: ErasureContext) -> int:
    tokens = [json.dumps(s) for s in sorted(ctx.subjects)]
    return ctx.conn.execute(text("""
        DELETE FROM backfill_events WHERE project_id = :p
          AND EXISTS (SELECT 1 FROM unnest(CAST(:t AS text[])) tok
                      WHERE strpos(convert_from(payload, 'UTF8'), tok) > 0)
    """), {"p": ctx.project_id, "t": tokens}).rowcount


def _delete_idempotency_records(ctx: ErasureContext) -> int:
    tokens = [json.dumps(s) for s in sorted(ctx.subjects)]
    return ctx.conn.execute(text("""
        DELETE FROM idempotency_records WHERE project_id = :p
          AND EXISTS (SELECT 1 FROM unnest(CAST(:t AS text[])) tok WHERE strpos(response_body::text, tok) > 0)
    """), {"p": ctx.project_id, "t": tokens}).rowcount


def _pseudonymise_append_only(ctx: ErasureContext) -> int:
    values = sorted(ctx.pseudonyms)
    done = ctx.conn.execute(text("SELECT api_erasure_pseudonymise(:p, :f, :t)"), {
        "p": ctx.project_id, "f": values, "t": [ctx.pseudonyms[v] for v in values]}).scalar_one()
    return int(done["audit_rows"]) + int(done["access_decision_rows"])


def _pseudonymise_transaction_metadata(ctx: ErasureContext) -> int:
    return service.pseudonymise_metadata(ctx.conn, wallet_id=ctx.wallet_id, replacements=ctx.pseudonyms)


def _pseudonymise_customer_ids(ctx: ErasureContext) -> int:
    rows = ctx.conn.execute(text("""
        SELECT id, external_customer_id FROM entitlements
        WHERE project_id = :p AND wallet_id = :w AND external_customer_id IS NOT NULL
          AND left(external_customer_id, 4) <> :prefix"""),
        {"p": ctx.project_id, "w": ctx.wallet_id, "prefix": PREFIX}).all()
    for row in rows:
        ctx.conn.execute(text("UPDATE entitlements SET external_customer_id = :c WHERE id = :id"), {
            "c": pseudonym(ctx.key, ctx.project_id, row.external_customer_id), "id": row.id})
    return len(rows)


def _clear_held(ctx: ErasureContext) -> int:
    return ctx.conn.execute(text(
        "UPDATE wallet_erasures SET subject_keys_held = NULL WHERE project_id = :p AND wallet_id = :w "
        "AND subject_keys_held IS NOT NULL"), {"p": ctx.project_id, "w": ctx.wallet_id}).rowcount


# ----------------------------------------------------------------------------------------------- the map

SUBJECT_ROWS = "rows naming the erased subject(s)"
WALLET_ROWS = "rows of the erased wallet"
NONE = "-"
OPERATOR = ("operator-supplied text; the API documents: never put personal data there. Kept: it is chained "
            "(idempotency keys also dedupe a retry, forever)")
LAW = "financial record kept by law (bookkeeping retention); no end-user identifier besides the wallet id"
TEAM = "a team member's data (users sign up to the dashboard), not an end user's: deleting a member is separate"

ENTRIES: tuple[Entry, ...] = (
    # --- PostgreSQL: the subject's identity
    Entry("postgres", "subject_keys", ("subject",), "delete", "keys naming the erased wallet",
          "the subject→wallet mapping; after erasure the subject is unknown (its next auto-provisioning "
          "generation gets a fresh wallet)", _delete_subject_keys),
    Entry("postgres", "wallets", ("owner_ref",), "tombstone", WALLET_ROWS,
          "random `erased_<hex>`, not derived from the subject; the row stays (transactions reference it), "
          "closed for good, `erased_at` set (its id is retired from auto-provisioning)", _tombstone_owner),
    Entry("postgres", "wallet_erasures", ("subject_keys_held",), "clear", WALLET_ROWS,
          "held only to restore a cancelled request", _clear_held),
    Entry("postgres", "wallet_erasures", ("analytics_pending",), "clear", WALLET_ROWS,
          "[subject, pseudonym] pairs kept only until the ClickHouse pass ran (api/wallets/erasure_analytics.py)",
          covered_by="clickhouse:usage_events"),
    Entry("postgres", "signup_bonus_grants", ("ip_network",), "clear", WALLET_ROWS,
          "the sign-up bonus decision's IP network", _clear_ip_network),
    Entry("postgres", "signup_bonus_grants", ("device_hash", "country"), "keep", WALLET_ROWS,
          "fraud prevention: an erase-and-re-register loop must not collect the bonus again; the device id is a "
          "per-project keyed hash, the raw id was never stored"),
    Entry("postgres", "ingested_events", ("subject", "event"), "delete", SUBJECT_ROWS,
          "the debugging log of accepted events", _delete_ingested_events),
    Entry("postgres", "backfill_events", ("payload",), "delete", SUBJECT_ROWS,
          "events held by backfill sessions (api/ingest/routes_backfills.py); a closed session's identities of the "
          "erased subject are forgotten with them (its old wallet is closed for good)", _delete_backfill_events),
    Entry("postgres", "idempotency_records", ("response_body",), "delete", "responses quoting the subject",
          "stored API answers (e.g. the wallet with its owner); otherwise purged after 3 days",
          _delete_idempotency_records),
    # --- PostgreSQL: append-only records, pseudonymised through SECURITY DEFINER functions
    Entry("postgres", "audit_log", ("before", "after", "target_id"), "pseudonymise", SUBJECT_ROWS,
          "append-only: `api_erasure_pseudonymise` (api_0017) replaces the subject's JSON string values; the "
          "entry, its actor and action stay", _pseudonymise_append_only),
    Entry("postgres", "access_decisions", ("subject",), "pseudonymise", SUBJECT_ROWS,
          "append-only: same function; decisions per pseudonym still add up", covered_by="postgres:audit_log"),
    Entry("postgres", "transactions", ("metadata", "metadata_salt"), "pseudonymise", WALLET_ROWS,
          "append-only and hash-chained: `ledger_erasure_pseudonymise_metadata` (ledger_0013) on chain-v2 rows, "
          "whose chain covers a salted commitment, not the metadata (ledger/README.md); the salt is dropped; rows "
          "posted before ledger_0013 are chain v1 and keep their metadata", _pseudonymise_transaction_metadata),
    Entry("postgres", "transactions", ("metadata_commitment",), "keep", NONE,
          "sha256(salt ‖ metadata): without the dropped salt it reveals nothing; the chain covers it"),
    Entry("postgres", "transactions", ("idempotency_key", "source_ref", "reason"), "keep", NONE, OPERATOR),
    Entry("postgres", "holds", ("idempotency_key",), "keep", NONE, OPERATOR),
    Entry("postgres", "credit_buckets", ("source_ref",), "keep", NONE, OPERATOR),
    Entry("postgres", "entitlements", ("external_customer_id",), "pseudonymise", WALLET_ROWS,
          "the provider's customer id (RevenueCat's app user id is often the subject); a renewal for an erased "
          "wallet is refused anyway (closed)", _pseudonymise_customer_ids),
    Entry("postgres", "payments", ("external_id", "payment_ref"), "keep (law)", NONE, LAW),
    Entry("postgres", "webhook_events", ("body", "signature", "body_sha256", "body_bytes"), "keep (law)", NONE,
          "the provider's signed delivery, evidence of a payment: rewriting it would void the signature"),
    Entry("postgres", "outbox", ("payload",), "expires", NONE,
          "transaction-posted events; published rows are purged after 24 h (`LEDGER_OUTBOX_RETENTION_S`)"),
    Entry("postgres", "project_settings", ("unknown_subjects",), "keep", NONE, "a policy: no personal data"),
    Entry("postgres", "signup_bonus_configs", ("ip_network_daily_limit", "require_device_id"), "keep", NONE,
          "configuration: no personal data"),
    Entry("postgres", "email_outbox", ("to_address", "subject", "body_text"), "team", NONE, TEAM),
    Entry("postgres", "users", ("email",), "team", NONE, TEAM),
    Entry("postgres", "invitations", ("email", "invited_by", "accepted_by"), "team", NONE, TEAM),
    Entry("postgres", "project_members", ("user_id",), "team", NONE, TEAM),
    Entry("postgres", "projects", ("owner_user_id",), "team", NONE, TEAM),
    Entry("postgres", "refresh_tokens", ("user_id",), "team", NONE, TEAM),
    Entry("postgres", "session_revocations", ("user_id",), "team", NONE, TEAM),
    Entry("postgres", "api_keys", ("created_by_user_id",), "team", NONE, TEAM),
    Entry("postgres", "checkout_sessions", ("created_by_user_id",), "team", NONE, TEAM),
    Entry("postgres", "audit_log", ("actor_user_id",), "team", NONE, TEAM),
    Entry("postgres", "access_decisions", ("actor_id",), "team", NONE, "the API key or member that asked"),
    # --- ClickHouse (analytics/erasure.py), run by api/wallets/erasure_analytics.py
    Entry("clickhouse", "usage_events", ("subject", "data"), "pseudonymise", SUBJECT_ROWS,
          "rewritten (subject is in the sort key): copied under the pseudonym, originals deleted; units intact",
          analytics=analytics_erasure.rewrite_usage_events),
    Entry("clickhouse", "access_decisions", ("subject",), "pseudonymise", SUBJECT_ROWS,
          "ALTER TABLE … UPDATE, mutations_sync=2", analytics=analytics_erasure.update_access_decisions),
    Entry("clickhouse", "dead_letters", ("payload", "headers"), "pseudonymise", SUBJECT_ROWS,
          "the subject's JSON string in the raw letter; letters expire after 30 days (TTL)",
          analytics=analytics_erasure.update_dead_letters),
    Entry("clickhouse", "ledger_transactions", ("idempotency_key", "source_ref", "reason"), "keep", NONE,
          OPERATOR + "; no metadata is copied to ClickHouse"),
    # --- Kafka: append-only logs, not rewritable; retention (7 days) < the erasure grace (30 days)
    Entry("kafka", "usage.events.v1", ("subject", "data"), "expires", NONE,
          "retention.ms (7 days) < API_ERASURE_GRACE_S (30 days): gone before the erasure runs"),
    Entry("kafka", "usage.events.dlq.v1", ("payload",), "expires", NONE, "same retention"),
    Entry("kafka", "ledger.charges.v1", (), "expires", NONE, "checkpoints carry wallet ids only"),
    Entry("kafka", "ledger.transactions.v1", ("metadata",), "expires", NONE, "same retention"),
    Entry("kafka", "access.decisions.v1", ("subject",), "expires", NONE, "same retention"),
)

#: the PostgreSQL steps the ``erase_accounts`` job runs, in this order (one transaction per erasure)
POSTGRES_STEPS: tuple[Entry, ...] = tuple(e for e in ENTRIES if e.store == "postgres" and e.apply is not None)


#: the ClickHouse steps the analytics pass runs per (subject, pseudonym), in this order
ANALYTICS_STEPS: tuple[Entry, ...] = tuple(e for e in ENTRIES if e.store == "clickhouse" and e.analytics is not None)


def mapped_columns(store: Store) -> set[tuple[str, str]]:
    return {(e.table, c) for e in ENTRIES if e.store == store for c in e.columns}


def markdown_table() -> str:
    """The table docs/erasure.md carries verbatim (a test compares them)."""
    lines = ["| store | table / topic | columns | erasure does | rows | why |", "|---|---|---|---|---|---|"]
    for e in ENTRIES:
        cols = ", ".join(f"`{c}`" for c in e.columns) or "-"
        lines.append(f"| {e.store} | `{e.table}` | {cols} | **{e.action}** | {e.rows} | {e.why} |")
    return "\n".join(lines) + "\n"


def run_postgres_steps(ctx: ErasureContext) -> dict[str, int]:
    """Every PostgreSQL step of the map, in order; returns rows changed per entry (for the audit entry)."""
    for entry in POSTGRES_STEPS:
        assert entry.apply is not None
        ctx.counts[f"{entry.table}.{'+'.join(entry.columns)}"] = entry.apply(ctx)
    return ctx.counts


if __name__ == "__main__":  # python -m api.wallets.erasure_map > the table for docs/erasure.md
    print(markdown_table(), end="")
