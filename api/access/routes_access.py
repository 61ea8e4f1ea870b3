"""Access checks and the decision log, under /api/v1/projects/{project_id}/access.

``POST /check`` asks "may this wallet (or subject) use this feature now?" and answers a recorded decision —
allowed or denied with a reason — optionally charging the feature's cost in the same transaction
(api/access/access_decisions.py; the rules are api/access/access_policy.py). ``GET /decisions`` lists the record."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from api.access.access_decisions import CheckRequest, check_charged, check_uncharged, list_decisions
from api.deps import ConnectionDep
from api.pagination import LIMIT_DEFAULT, LIMIT_MAX
from api.tenancy.auth import (
    DeferredAccess,
    ProjectAccess,
    project_access,
    require_project,
    require_project_deferred,
)
from api.validation import RequestModel, StrictInt
from api.wallets.idempotency import HotTransaction, fingerprint, require_key
from api.wallets.routes_wallet_ops import IdempotencyKey
from api.wallets.wallet_models import BalanceOut
from ledger.postings import WalletBalance
from ledger.rows import WalletRow

router = APIRouter(prefix="/api/v1/projects/{project_id}/access", tags=["access"])
Read = Annotated[ProjectAccess, require_project("read")]
Deferred = Annotated[DeferredAccess, require_project_deferred("read")]
DenialReason = Literal["wallet_closed", "wallet_blocked", "upgrade_required", "insufficient_credits"]  # access_policy.REASONS


class AccessCheckRequest(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"subject": "customer-42", "feature_key": "image_to_image", "quantity": 1, "asset_id": "model:llm-base",
         "action": "execute", "charge": True},
        {"wallet_id": "w_5f0c...", "feature_key": "export_pdf"}]})
    wallet_id: str | None = Field(default=None, min_length=1, max_length=200, description="the wallet to check")
    subject: str | None = Field(default=None, min_length=1, max_length=256,
                                description="or your customer's id: its subject wallet (none yet = no credits)")
    feature_key: str = Field(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,99}$", description="a feature of the price list")
    quantity: StrictInt = Field(default=1, ge=1, le=1_000_000, description="uses of the feature")
    asset_id: str | None = Field(default=None, max_length=200, description="what is accessed (telemetry)")
    action: str | None = Field(default=None, max_length=64, description="read, download, execute… (telemetry)")
    charge: bool = Field(default=False, description="debit the cost when allowed (needs Idempotency-Key and a "
                                                    "member role or an admin key)")

    @model_validator(mode="after")
    def _one_target(self) -> Any:
        if (self.wallet_id is None) == (self.subject is None):
            raise ValueError("give exactly one of wallet_id or subject")
        return self

    def as_check(self) -> CheckRequest:
        return CheckRequest(wallet_id=self.wallet_id, subject=self.subject, feature_key=self.feature_key,
                            quantity=self.quantity, asset_id=self.asset_id, action=self.action, charge=self.charge)


class AccessDecisionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "decision_id": "dec_3f2a...", "allowed": False, "reason": "upgrade_required", "policy_id": "entitlement_gate",
        "wallet_id": "w_5f0c...", "subject": "customer-42", "feature_key": "image_to_image", "quantity": 1,
        "asset_id": "model:llm-base", "action": "execute", "cost_minor": 5, "charged": False,
        "transaction_id": None, "balance_after_minor": None, "created_at": "2026-01-01T00:00:00Z"}]})
    decision_id: str
    allowed: bool
    reason: str | None = Field(description="why it was denied: wallet_closed, wallet_blocked, upgrade_required, "
                                           "insufficient_credits; null when allowed")
    policy_id: str = Field(description="the rule that decided: wallet_closed, debt_block, entitlement_gate, "
                                       "credit_balance, no_cost")
    wallet_id: str
    subject: str
    feature_key: str
    quantity: int
    asset_id: str | None
    action: str | None
    cost_minor: int = Field(description="unit cost × quantity (charged only when charged is true)")
    charged: bool
    transaction_id: int | None = Field(description="the debit, when charged")
    balance_after_minor: int | None = Field(description="the wallet's balance after the debit, when charged")
    created_at: datetime


class AccessCheckOut(AccessDecisionOut):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "decision_id": "dec_9b1c...", "allowed": True, "reason": None, "policy_id": "credit_balance",
        "wallet_id": "w_5f0c...", "subject": "customer-42", "feature_key": "image_to_image", "quantity": 1,
        "asset_id": "model:llm-base", "action": "execute", "cost_minor": 5, "charged": True, "transaction_id": 981,
        "balance_after_minor": 1195, "created_at": "2026-01-01T00:00:00Z",
        "balance": {"balance_minor": 1195, "held_minor": 0, "floor_minor": 0, "unsettled_minor": 0, "available_minor": 1195,
                    "debt_minor": 0, "blocked": False}}]})
    balance: BalanceOut | None = Field(description="the wallet after the debit, when charged")


class DecisionPageOut(BaseModel):
    items: list[AccessDecisionOut]
    next_cursor: str | None


def _balance(_wallet: WalletRow, state: WalletBalance) -> dict[str, Any]:
    return BalanceOut.of(state).model_dump(mode="json")


@router.post("/check", response_model=AccessCheckOut, summary="May this wallet use this feature now? A recorded "
             "decision, optionally charged", responses={
                 400: {"description": "charge without Idempotency-Key (api.idempotency_key_required)"},
                 403: {"description": "charge=true needs a member role (or an admin key); a check needs viewer"},
                 404: {"description": "no such project (for you) or wallet"},
                 409: {"description": "the Idempotency-Key was used for a different request"},
                 422: {"description": "unknown feature (api.unknown_feature) or invalid body"}})
async def check(body: AccessCheckRequest, request: Request, access: Deferred,
                idempotency_key: IdempotencyKey = None) -> Response:
    """Rules, in order: wallet closed by an account erasure → ``wallet_closed``; wallet in debt → ``wallet_blocked``; feature needs an active plan the wallet lacks →
    ``upgrade_required``; cost > available credits → ``insufficient_credits``; else allowed. Allowed and denied
    decisions are both answered 200 and recorded; with ``charge`` an allowed decision debits its cost in the
    same transaction (a check that loses a race is denied, never an overspend)."""
    client_key = require_key(idempotency_key) if body.charge or idempotency_key is not None else None
    req = body.as_check()
    request_fingerprint = fingerprint(method=request.method, path=request.url.path, body=body.model_dump(mode="json"))
    engine = request.app.state.engine
    action = "write" if body.charge else "read"

    def resolve(conn: Any) -> ProjectAccess:
        return project_access(conn, access.principal, access.project_id, action, access.request_id)

    def run() -> Response:
        if body.charge:
            assert client_key is not None
            with engine.connect() as conn:
                resolved = resolve(conn)
                hot = HotTransaction(conn, project_id=resolved.project_id, key=client_key,
                                     request_fingerprint=request_fingerprint)
                return check_charged(conn, resolved, hot, req, _balance)
        with engine.begin() as conn:
            return check_uncharged(conn, resolve(conn), req, key=client_key, request_fingerprint=request_fingerprint)

    return await run_in_threadpool(run)


@router.get("/decisions", response_model=DecisionPageOut, summary="The project's access decisions, newest first")
def decisions(access: Read, conn: ConnectionDep,
              allowed: bool | None = None,
              reason: Annotated[DenialReason | None, Query(description="a denial reason")] = None,
              wallet_id: Annotated[str | None, Query(max_length=200)] = None,
              subject: Annotated[str | None, Query(max_length=256)] = None,
              feature_key: Annotated[str | None, Query(max_length=100)] = None,
              since: Annotated[datetime | None, Query(description="inclusive, ISO 8601 with offset")] = None,
              until: Annotated[datetime | None, Query(description="exclusive")] = None,
              cursor: str | None = None,
              limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT) -> DecisionPageOut:
    page = list_decisions(conn, project_id=access.project_id, allowed=allowed, reason=reason, wallet_id=wallet_id,
                          subject=subject, feature_key=feature_key, since=since, until=until, cursor=cursor,
                          limit=limit)
    return DecisionPageOut(items=[AccessDecisionOut(**item) for item in page.items], next_cursor=page.next_cursor)
