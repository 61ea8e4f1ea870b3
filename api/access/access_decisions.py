"""Access checks: read the facts, ask the pure policy (api/access/access_policy.py), optionally charge, and record
the decision — every one, allowed or denied.

Invariants:

- **Every decision is recorded durably, in the check's own transaction.** One statement writes the
  ``access_decisions`` row (append-only), its outbox row (topic ``access.decisions.v1``, key = wallet) and,
  when the request carried an Idempotency-Key, the idempotency record (plus an audit row for a charge). For a
  charged check that statement travels with the ledger's debit and the COMMIT, so a charged decision is never
  missing its record and a record never claims a charge that rolled back.
- **Published at least once, after commit.** The ledger's outbox relay (ledger/outbox.py, run by
  `meterline run ledger`) publishes outbox rows of every topic in id order and marks them only after the broker
  acknowledged them; a crash in between publishes a decision twice, and analytics keeps one row per
  ``decision_id`` (ReplacingMergeTree read with FINAL).
- **A charge never overspends.** A charged check runs the debit route's own path (``ledger.service.DebitStage``
  under ``api.wallets.idempotency.HotTransaction``): the wallet row is locked FIRST, and the facts the policy sees
  (balance, held, floor, debt, entitlements) are read after the lock, so concurrent checks on one wallet
  decide one after the other on fresh figures. Should the ledger's own debit check still refuse an allowed
  decision, the decision becomes a denial ``insufficient_credits`` (``access_policy.lost_race``), never a debit
  below the floor.
- **Idempotency as for debits.** Same key + same body → the stored answer (same ``decision_id``,
  ``Idempotent-Replayed: true``), another body → 409. Denials are answers too and are stored (the decision was
  made and recorded; a new attempt is a new key). After the record is purged, a retried charge finds the ledger
  key's debit (``outcome: duplicate``) and answers the decision that made it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Connection, text

from api.access.access_policy import Decision, FeatureRule, WalletFacts, evaluate, lost_race
from api.errors import ApiError, NotFound
from api.pagination import LIMIT_DEFAULT, InvalidCursor, decode_cursor, encode_cursor
from api.payments.effects import ACCESS_STATUSES
from api.tenancy.auth import ProjectAccess
from api.wallets.feature_costs import UnknownFeature
from api.wallets.idempotency import REPLAYED_HEADER, HotTransaction, ledger_key, lookup, pipelined_connection
from ledger import service
from ledger.rows import WalletRow
from streams import catalog

#: Kafka topic of access decisions (base name; the relay adds METERLINE_TOPIC_PREFIX). analytics reads it as
#: ANALYTICS_ACCESS_DECISIONS_TOPIC (same default) and meterline/topics.py creates it.
TOPIC_ACCESS_DECISIONS = "access.decisions.v1"
#: the largest amount a money route accepts (api/wallets/wallet_models.py AMOUNT)
COST_MAX_MINOR = 10**15

_COLUMNS = ("id, project_id, wallet_id, subject, feature_key, quantity, asset_id, action, allowed, reason, "
            "policy_id, cost_minor, charged, transaction_id, balance_after_minor, created_at")

# The feature's price and gate, the wallet's active plans and the transaction time — one statement, queued after
# the wallet lock (so entitlements revoked by a refund that committed before the lock are seen).
_FACTS = """
SELECT now(), f.cost_minor, f.requires_entitlement,
       ARRAY(SELECT DISTINCT o.slug FROM entitlements e JOIN payment_offers o ON o.id = e.offer_id
             WHERE e.project_id = %(project)s AND e.wallet_id = %(wallet)s AND e.status = ANY(%(statuses)s)
               AND (e.current_period_end IS NULL OR e.current_period_end > now()))
FROM (SELECT 1) AS one LEFT JOIN feature_costs f ON f.project_id = %(project)s AND f.feature_key = %(feature)s
"""

# The decision, its outbox row, and (with a key) the idempotency record and (for a charge) the audit row.
_WRITE = """
WITH decision AS (
    INSERT INTO access_decisions (id, project_id, wallet_id, subject, feature_key, quantity, asset_id, action,
        allowed, reason, policy_id, cost_minor, charged, transaction_id, balance_after_minor, idempotency_key,
        actor_kind, actor_id, request_id, created_at)
    VALUES (%(id)s, %(project)s, %(wallet)s, %(subject)s, %(feature)s, %(quantity)s, %(asset)s, %(action)s,
        %(allowed)s, %(reason)s, %(policy)s, %(cost)s, %(charged)s, %(tx)s, %(balance_after)s, %(key)s,
        %(actor_kind)s, %(actor_id)s, %(request_id)s, %(now)s)
), outbox AS (
    INSERT INTO outbox (topic, key, payload, created_at)
    VALUES (%(topic)s, %(wallet)s, convert_to(%(payload)s, 'UTF8'), %(now)s)
), audit AS (
    INSERT INTO audit_log (project_id, actor_kind, actor_user_id, actor_key_id, action, target_kind, target_id,
                           after, request_id)
    SELECT %(project)s, %(actor_kind)s, %(user_id)s, %(key_id)s, 'access.charge', 'transaction',
           CAST(%(tx)s AS text), %(audit_after)s::jsonb, %(request_id)s
    WHERE %(charged)s
)
INSERT INTO idempotency_records (project_id, idempotency_key, request_fingerprint, status_code, response_body)
SELECT %(project)s, %(key)s, %(fingerprint)s, 200, %(body)s::jsonb WHERE %(key)s::text IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class CheckRequest:
    wallet_id: str | None
    subject: str | None
    feature_key: str
    quantity: int
    asset_id: str | None
    action: str | None
    charge: bool


@dataclass(frozen=True, slots=True)
class Target:
    wallet_id: str
    subject: str | None
    named_wallet: bool  # the caller named the wallet (missing → 404); else a subject (missing → empty wallet)


def resolve_target(conn: Connection, *, project_id: str, req: CheckRequest) -> Target:
    """The wallet a check is about: the one named, else the subject's (its subject key, else the id usage would
    provision for it — so a purchase made later for that subject lands on the same wallet)."""
    if req.wallet_id is not None:
        return Target(req.wallet_id, None, True)
    assert req.subject is not None
    mapped = conn.execute(text("SELECT wallet_id FROM subject_keys WHERE project_id = :p AND subject = :s"),
                          {"p": project_id, "s": req.subject}).scalar()
    if mapped:
        return Target(str(mapped), req.subject, False)
    return Target(catalog.provisioned_wallet(conn, project_id=project_id, subject=req.subject), req.subject, False)


# ------------------------------------------------------------------------------------------------ facts


class QueuedFacts:
    """The ``_FACTS`` read, queued on the psycopg connection (inside a pipeline: sent with the wallet lock)."""

    def __init__(self, raw: psycopg.Connection[Any], *, project_id: str, wallet_id: str, feature_key: str) -> None:
        self.feature_key = feature_key
        self._cursor = raw.cursor()
        self._cursor.execute(_FACTS, {"project": project_id, "wallet": wallet_id, "feature": feature_key,
                                      "statuses": list(ACCESS_STATUSES)})

    def fetch(self) -> tuple[datetime, FeatureRule, frozenset[str]]:
        """(transaction time, the feature's rule, active plan slugs); an unknown feature is a 422."""
        row = self._cursor.fetchone()
        assert row is not None
        now, cost, gate, plans = row
        if cost is None:
            raise UnknownFeature(f"no cost is configured for feature {self.feature_key!r}",
                                 extra={"feature_key": self.feature_key})
        return now, FeatureRule(self.feature_key, int(cost), gate), frozenset(plans or ())


def require_cost_in_range(rule: FeatureRule, quantity: int) -> None:
    """A cost beyond any amount the ledger accepts (10^15 minor units) is a bad request, not a decision."""
    if rule.unit_cost_minor * quantity > COST_MAX_MINOR:
        raise ApiError(f"{quantity} × {rule.unit_cost_minor} exceeds the largest amount ({COST_MAX_MINOR})",
                       status=422, extra={"feature_key": rule.feature_key, "quantity": quantity})


def wallet_facts(wallet: WalletRow | None, plans: frozenset[str]) -> WalletFacts:
    if wallet is None:
        return WalletFacts.empty()
    state = wallet.state
    return WalletFacts(debt_minor=state.debt_minor, available_minor=state.available_minor, active_plans=plans,
                       closed=wallet.closed_at is not None)


# ------------------------------------------------------------------------------------------------ output


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def decision_json(row: dict[str, Any]) -> dict[str, Any]:
    """A decision as the API shows it (``row`` has the table's columns)."""
    return {"decision_id": row["id"], "allowed": row["allowed"], "reason": row["reason"],
            "policy_id": row["policy_id"], "wallet_id": row["wallet_id"], "subject": row["subject"],
            "feature_key": row["feature_key"], "quantity": row["quantity"], "asset_id": row["asset_id"],
            "action": row["action"], "cost_minor": row["cost_minor"], "charged": row["charged"],
            "transaction_id": row["transaction_id"], "balance_after_minor": row["balance_after_minor"],
            "created_at": _iso(row["created_at"])}


def event_payload(row: dict[str, Any]) -> bytes:
    """The ``access.decisions.v1`` message (analytics/rows.py ``decision_rows`` reads it)."""
    d = decision_json(row)
    return orjson.dumps({"decision_id": d["decision_id"], "project_id": row["project_id"], "subject": d["subject"],
                         "wallet_id": d["wallet_id"], "asset_id": d["asset_id"], "action": d["action"],
                         "feature_key": d["feature_key"], "quantity": d["quantity"], "allowed": d["allowed"],
                         "reason": d["reason"], "policy_id": d["policy_id"], "cost_minor": d["cost_minor"],
                         "charged": d["charged"], "transaction_id": d["transaction_id"], "time": d["created_at"]})


# ------------------------------------------------------------------------------------------------ writing


def _queue_write(raw: psycopg.Connection[Any], access: ProjectAccess, *, row: dict[str, Any], key: str | None,
                 request_fingerprint: str | None, body: bytes, audit_after: dict[str, Any] | None) -> None:
    p = access.principal
    raw.cursor().execute(_WRITE, {
        "id": row["id"], "project": row["project_id"], "wallet": row["wallet_id"], "subject": row["subject"],
        "feature": row["feature_key"], "quantity": row["quantity"], "asset": row["asset_id"],
        "action": row["action"], "allowed": row["allowed"], "reason": row["reason"], "policy": row["policy_id"],
        "cost": row["cost_minor"], "charged": row["charged"], "tx": row["transaction_id"],
        "balance_after": row["balance_after_minor"], "key": key, "actor_kind": p.kind,
        "actor_id": p.user_id if p.kind == "user" else p.key_id, "user_id": p.user_id, "key_id": p.key_id,
        "request_id": access.request_id, "now": row["created_at"], "topic": TOPIC_ACCESS_DECISIONS,
        "payload": event_payload(row).decode(), "fingerprint": request_fingerprint, "body": body.decode(),
        "audit_after": orjson.dumps(audit_after).decode() if audit_after is not None else None})


def _row(access: ProjectAccess, target: Target, wallet: WalletRow | None, req: CheckRequest, decision: Decision,
         now: datetime) -> dict[str, Any]:
    subject = target.subject or (wallet.owner_ref if wallet is not None else target.wallet_id)
    return {"id": f"dec_{uuid.uuid4().hex}", "project_id": access.project_id, "wallet_id": target.wallet_id,
            "subject": subject, "feature_key": req.feature_key, "quantity": req.quantity, "asset_id": req.asset_id,
            "action": req.action, "allowed": decision.allowed, "reason": decision.reason,
            "policy_id": decision.policy_id, "cost_minor": decision.cost_minor, "charged": False,
            "transaction_id": None, "balance_after_minor": None, "created_at": now}


def _response(body: dict[str, Any]) -> tuple[bytes, Response]:
    content = orjson.dumps(body)
    return content, Response(content, status_code=200, media_type="application/json",
                             headers={REPLAYED_HEADER: "false"})


def check_uncharged(conn: Connection, access: ProjectAccess, req: CheckRequest, *, key: str | None,
                    request_fingerprint: str) -> Response:
    """A check without a charge, in ``conn``'s transaction (the caller commits). No wallet lock: nothing moves."""
    if key is not None:
        replay = lookup(conn, project_id=access.project_id, key=key, request_fingerprint=request_fingerprint)
        if replay is not None:
            return replay
    target = resolve_target(conn, project_id=access.project_id, req=req)
    found = conn.execute(text("SELECT * FROM wallets WHERE id = :w AND project_id = :p"),
                         {"w": target.wallet_id, "p": access.project_id}).mappings().first()
    wallet = WalletRow.from_mapping(found) if found else None
    if wallet is None and target.named_wallet:
        raise NotFound("wallet not found", extra={"wallet_id": target.wallet_id})
    raw = pipelined_connection(conn)
    now, rule, plans = QueuedFacts(raw, project_id=access.project_id, wallet_id=target.wallet_id,
                                   feature_key=req.feature_key).fetch()
    require_cost_in_range(rule, req.quantity)
    decision = evaluate(rule, req.quantity, wallet_facts(wallet, plans))
    row = _row(access, target, wallet, req, decision, now)
    body = {**decision_json(row), "balance": None}
    content, response = _response(body)
    _queue_write(raw, access, row=row, key=key, request_fingerprint=request_fingerprint, body=content,
                 audit_after=None)
    return response


def check_charged(conn: Connection, access: ProjectAccess, hot: HotTransaction, req: CheckRequest,
                  balance_of: Any) -> Response:
    """A check that debits an allowed decision's cost, on the debit route's path (two round trips: [lock the
    wallet, its buckets, the key's earlier use, the facts, the record lookup], then [debit, decision + outbox +
    audit + record, COMMIT]). ``balance_of(wallet, WalletBalance)`` renders the balance."""
    target = resolve_target(conn, project_id=access.project_id, req=req)
    client_key = hot.key

    def make() -> tuple[service.DebitStage, QueuedFacts]:
        stage = service.DebitStage(conn, wallet_id=target.wallet_id, project_id=access.project_id,
                                   idempotency_key=ledger_key(access.project_id, client_key, suffix=":access"))
        facts = QueuedFacts(pipelined_connection(conn), project_id=access.project_id, wallet_id=target.wallet_id,
                            feature_key=req.feature_key)
        return stage, facts

    staged = hot.stage(make)
    if isinstance(staged, Response):
        return staged
    stage, queued = staged
    wallet = stage.fetch()
    if wallet is None and target.named_wallet:
        raise NotFound("wallet not found", extra={"wallet_id": target.wallet_id})
    now, rule, plans = queued.fetch()
    require_cost_in_range(rule, req.quantity)
    decision = evaluate(rule, req.quantity, wallet_facts(wallet, plans))
    charging = decision.allowed and decision.cost_minor > 0
    if charging:
        assert wallet is not None  # an absent wallet has nothing available: only a free feature is allowed
        duplicate = stage.duplicate(amount_minor=decision.cost_minor)
        if duplicate is not None:  # the record was purged; the ledger key says this check already charged
            return replay_by_transaction(conn, access.project_id, duplicate.transaction.id)
        if wallet.state.blocked or not wallet.state.can_debit(decision.cost_minor):  # the ledger's own check
            decision, charging = lost_race(decision), False
    row = _row(access, target, wallet, req, decision, now)
    with hot.write():
        balance = None
        audit_after = None
        if charging:
            assert wallet is not None
            posted = stage.post(amount_minor=decision.cost_minor, source_ref=f"feature:{req.feature_key}",
                                metadata={"feature_key": req.feature_key, "quantity": req.quantity,
                                          "unit_cost_minor": rule.unit_cost_minor, "decision_id": row["id"],
                                          **({"asset_id": req.asset_id} if req.asset_id else {}),
                                          **({"action": req.action} if req.action else {}),
                                          "actor": access.principal.user_id or access.principal.key_id,
                                          "actor_kind": access.principal.kind, "request_id": access.request_id})
            assert isinstance(posted, service.Posted)  # a duplicate was answered above
            tx = posted.result.transaction
            row.update(charged=True, transaction_id=tx.id, balance_after_minor=tx.balance_after_minor)
            balance = balance_of(wallet, posted.balance)
            audit_after = {"kind": tx.kind, "amount_minor": tx.amount_minor,
                           "balance_before_minor": tx.balance_before_minor,
                           "balance_after_minor": tx.balance_after_minor, "idempotency_key": tx.idempotency_key,
                           "wallet_id": wallet.id, "decision_id": row["id"], "feature_key": req.feature_key,
                           "quantity": req.quantity, "unit_cost_minor": rule.unit_cost_minor}
        content, hot.response = _response({**decision_json(row), "balance": balance})
        _queue_write(pipelined_connection(conn), access, row=row, key=client_key,
                     request_fingerprint=hot.request_fingerprint, body=content, audit_after=audit_after)
    assert hot.response is not None
    return hot.response


def replay_by_transaction(conn: Connection, project_id: str, transaction_id: int) -> Response:
    row = conn.execute(text(f"SELECT {_COLUMNS} FROM access_decisions WHERE project_id = :p AND transaction_id = :t"),
                       {"p": project_id, "t": transaction_id}).mappings().first()
    conn.rollback()
    if row is None:  # the key was used by another kind of request long ago
        raise NotFound("no access decision made that charge", extra={"transaction_id": transaction_id})
    return JSONResponse({**decision_json(dict(row)), "balance": None}, headers={REPLAYED_HEADER: "true"})


# ------------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True, slots=True)
class DecisionPage:
    items: list[dict[str, Any]]
    next_cursor: str | None


def list_decisions(conn: Connection, *, project_id: str, allowed: bool | None = None, reason: str | None = None,
                   wallet_id: str | None = None, subject: str | None = None, feature_key: str | None = None,
                   since: datetime | None = None, until: datetime | None = None, cursor: str | None = None,
                   limit: int = LIMIT_DEFAULT) -> DecisionPage:
    """Newest first; ``since`` inclusive, ``until`` exclusive; keyset pagination on (created_at, id)."""
    position = decode_cursor(cursor) or {}
    if position and not (isinstance(position.get("c"), str) and isinstance(position.get("i"), str)):
        raise InvalidCursor("the cursor is not one this API returned")
    try:
        after = datetime.fromisoformat(position["c"]) if position else None
    except ValueError as exc:
        raise InvalidCursor("the cursor is not one this API returned") from exc
    rows = conn.execute(text(f"""
        SELECT {_COLUMNS} FROM access_decisions
        WHERE project_id = :p
          AND (CAST(:allowed AS boolean) IS NULL OR allowed = :allowed)
          AND (CAST(:reason AS text) IS NULL OR reason = :reason)
          AND (CAST(:wallet AS text) IS NULL OR wallet_id = :wallet)
          AND (CAST(:subject AS text) IS NULL OR subject = :subject)
          AND (CAST(:feature AS text) IS NULL OR feature_key = :feature)
          AND (CAST(:since AS timestamptz) IS NULL OR created_at >= :since)
          AND (CAST(:until AS timestamptz) IS NULL OR created_at < :until)
          AND (CAST(:bc AS timestamptz) IS NULL OR (created_at, id) < (CAST(:bc AS timestamptz), :bi))
        ORDER BY created_at DESC, id DESC LIMIT :limit"""),
                        {"p": project_id, "allowed": allowed, "reason": reason, "wallet": wallet_id,
                         "subject": subject, "feature": feature_key, "since": since, "until": until,
                         "bc": after, "bi": position.get("i"), "limit": limit + 1}).mappings().all()
    items = [decision_json(dict(r)) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor({"c": last["created_at"].isoformat(), "i": last["id"]})
    return DecisionPage(items, next_cursor)
