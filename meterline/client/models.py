"""Typed results of the money API (pydantic models). Unknown fields are kept (``extra="allow"``), so a newer
API never breaks an older SDK; amounts are integers in minor units, times are UTC datetimes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["AccessDecision", "Allocation", "Balance", "Commit", "Hold", "HoldResult", "Posting", "Transaction",
           "TransactionPage", "Wallet"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Balance(_Model):
    balance_minor: int
    held_minor: int
    floor_minor: int
    available_minor: int
    debt_minor: int
    blocked: bool


class Wallet(_Model):
    id: str
    project_id: str
    owner_kind: str
    owner_ref: str
    credit_code: str
    credit_scale: int
    created_at: datetime
    balance: Balance
    closed_at: datetime | None = None


class Allocation(_Model):
    bucket_id: int | None
    amount_minor: int
    bucket_source: str | None


class Transaction(_Model):
    id: int
    wallet_id: str
    kind: str
    amount_minor: int
    balance_before_minor: int
    balance_after_minor: int
    idempotency_key: str
    source_ref: str | None = None
    related_transaction_id: int | None = None
    hold_id: str | None = None
    meter_id: str | None = None
    reason: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime
    allocations: list[Allocation] = []


class TransactionPage(_Model):
    items: list[Transaction]
    next_cursor: str | None


class Posting(_Model):
    """A money operation's result: ``duplicate`` when the Idempotency-Key was used before for the same request
    (nothing new was written; ``transaction`` is the original)."""

    outcome: Literal["created", "duplicate"]
    transaction: Transaction
    balance: Balance


class Hold(_Model):
    id: str
    wallet_id: str
    amount_minor: int
    status: str
    expires_at: datetime
    committed_transaction_id: int | None
    created_at: datetime
    updated_at: datetime


class HoldResult(_Model):
    hold: Hold
    balance: Balance


class Commit(_Model):
    hold_id: str
    transaction: Transaction
    balance: Balance


class AccessDecision(_Model):
    decision_id: str
    allowed: bool
    reason: str | None
    policy_id: str
    wallet_id: str
    subject: str
    feature_key: str
    quantity: int
    cost_minor: int
    charged: bool
    transaction_id: int | None = None
    balance_after_minor: int | None = None
    created_at: datetime
    balance: Balance | None = None
