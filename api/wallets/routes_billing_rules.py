"""Billing rules (fixed fees on a schedule, charged by the scheduler) and the log of their runs.

Admins create, change, pause, resume and archive rules; everyone in the project reads rules and runs. The
money side and its invariants live in ``ledger/billing.py``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.deps import ConnectionDep
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from ledger import billing

router = APIRouter(prefix="/api/v1/projects/{project_id}", tags=["billing rules"])
Read = Annotated[ProjectAccess, require_project("read")]
Admin = Annotated[ProjectAccess, require_project("admin")]
RULE_ID = Path(max_length=100, examples=["br_5f0c2a9e1b7d4c3a"])


class BillingRuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"wallet_id": "w_5f0c...", "name": "Pro seat", "amount_minor": 500,
         "schedule": {"kind": "monthly", "days": [1]}},
        {"wallet_id": "w_5f0c...", "name": "Weekday support", "amount_minor": 20,
         "schedule": {"kind": "weekly", "days": ["mon", "tue", "wed", "thu", "fri"], "hour": 9},
         "when_insufficient": "skip"},
        {"wallet_id": "w_5f0c...", "name": "Quarter-hourly probe", "amount_minor": 1,
         "schedule": {"kind": "cron", "expression": "*/15 * * * *"}}]})
    wallet_id: str = Field(max_length=200)
    name: str = Field(min_length=1, max_length=200)
    amount_minor: int = Field(gt=0, le=10**15, description="credits (minor units) charged at every due time")
    schedule: dict[str, Any] = Field(description="UTC. kind daily {hour, minute}; weekly {days: [mon..sun]}; "
                                                 "monthly {days: [1..28 | \"last\"]}; cron {expression}")
    when_insufficient: Literal["debt", "skip"] = Field(
        default="debt", description="debt: post the fee anyway (the uncovered part is debt and blocks the wallet); "
                                    "skip: record the due time as skipped and post nothing")
    starts_at: AwareDatetime | None = Field(default=None, description="first due time is after this (default now)")


class BillingRulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"status": "paused"},
                                                                              {"amount_minor": 600}]})
    name: str | None = Field(default=None, min_length=1, max_length=200)
    amount_minor: int | None = Field(default=None, gt=0, le=10**15)
    status: Literal["active", "paused"] | None = Field(
        default=None, description="paused due times are never charged; resuming starts at the next due time")


# The ledger's row types are the wire shapes too (FastAPI serializes dataclasses): one definition each.
BillingRuleOut = billing.BillingRuleRow
BillingRunOut = billing.BillingRunRow


class BillingRunPage(BaseModel):
    items: list[BillingRunOut]
    next_before_id: int | None = Field(description="pass as before_id for older runs; null = no more")


def _audit_view(rule: billing.BillingRuleRow) -> dict[str, Any]:
    return {k: v for k, v in rule.as_dict().items() if k not in ("created_at", "updated_at", "last_run_at")}


@router.post("/billing-rules", status_code=201, response_model=BillingRuleOut,
             summary="Charge a wallet a fixed fee on a schedule (admin)")
def create_rule(body: BillingRuleIn, access: Admin, conn: ConnectionDep) -> BillingRuleOut:
    rule = billing.create_rule(conn, project_id=access.project_id, wallet_id=body.wallet_id, name=body.name,
                               schedule=body.schedule, amount_minor=body.amount_minor,
                               when_insufficient=body.when_insufficient, starts_at=body.starts_at)
    audit(conn, access, action="billing_rule.create", target_kind="billing_rule", target_id=rule.id,
          after=_audit_view(rule))
    return rule


@router.get("/billing-rules", response_model=list[BillingRuleOut], summary="The project's billing rules")
def list_rules(access: Read, conn: ConnectionDep,
               wallet_id: Annotated[str | None, Query(max_length=200)] = None,
               status: Annotated[Literal["active", "paused", "archived"] | None, Query()] = None) -> list[BillingRuleOut]:
    return billing.list_rules(conn, project_id=access.project_id, wallet_id=wallet_id, status=status)


@router.get("/billing-rules/{rule_id}", response_model=BillingRuleOut, summary="One billing rule")
def get_rule(rule_id: Annotated[str, RULE_ID], access: Read, conn: ConnectionDep) -> BillingRuleOut:
    return billing.get_rule(conn, project_id=access.project_id, rule_id=rule_id)


@router.patch("/billing-rules/{rule_id}", response_model=BillingRuleOut,
              summary="Rename, re-price, pause or resume a billing rule (admin)")
def update_rule(rule_id: Annotated[str, RULE_ID], body: BillingRulePatch, access: Admin,
                conn: ConnectionDep) -> BillingRuleOut:
    before, after = billing.update_rule(conn, project_id=access.project_id, rule_id=rule_id, name=body.name,
                                        amount_minor=body.amount_minor, status=body.status)
    audit(conn, access, action="billing_rule.update", target_kind="billing_rule", target_id=rule_id,
          before=_audit_view(before), after=_audit_view(after))
    return after


@router.delete("/billing-rules/{rule_id}", response_model=BillingRuleOut,
               summary="Archive a billing rule (admin; final, its runs stay)")
def archive_rule(rule_id: Annotated[str, RULE_ID], access: Admin, conn: ConnectionDep) -> BillingRuleOut:
    before, after = billing.update_rule(conn, project_id=access.project_id, rule_id=rule_id, status="archived")
    audit(conn, access, action="billing_rule.archive", target_kind="billing_rule", target_id=rule_id,
          before=_audit_view(before), after=_audit_view(after))
    return after


@router.get("/billing-runs", response_model=BillingRunPage, summary="Billing runs, newest first")
def list_runs(access: Read, conn: ConnectionDep, rule_id: Annotated[str | None, Query(max_length=100)] = None,
              wallet_id: Annotated[str | None, Query(max_length=200)] = None,
              status: Annotated[Literal["charged", "debt", "skipped"] | None, Query()] = None,
              before_id: Annotated[int | None, Query(ge=1)] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> BillingRunPage:
    runs = billing.list_runs(conn, project_id=access.project_id, rule_id=rule_id, wallet_id=wallet_id,
                             status=status, before_id=before_id, limit=limit)
    return BillingRunPage(items=runs, next_before_id=runs[-1].id if len(runs) == limit else None)
