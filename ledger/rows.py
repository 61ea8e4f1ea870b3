"""Plain, immutable rows the ledger's service and queries return (no SQLAlchemy objects leak out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from ledger.postings import WalletBalance

__all__ = [
    "WALLET_COLUMNS",
    "AllocationRow",
    "BalanceView",
    "BucketRow",
    "CheckpointOutcome",
    "HoldRow",
    "PartitionSnapshot",
    "PostingResult",
    "SnapshotCounter",
    "TransactionRow",
    "WalletRow",
]


@dataclass(frozen=True, slots=True)
class WalletRow:
    id: str
    project_id: str
    owner_kind: str
    owner_ref: str
    credit_code: str
    credit_scale: int
    balance_minor: int
    held_minor: int
    floor_minor: int
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None  # closed: new debits, reservations, grants and refunds are refused
    unsettled_minor: int = 0  # usage priced but not posted yet (ledger/settle.py); counts as spent

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> WalletRow:
        return cls(**{name: row[name] for name in cls.__slots__})

    @property
    def state(self) -> WalletBalance:
        return WalletBalance(self.balance_minor, self.held_minor, self.floor_minor, self.unsettled_minor)


#: The wallets columns in WalletRow's field order: ``SELECT {WALLET_COLUMNS}`` rows build with ``WalletRow(*row)``.
WALLET_COLUMNS = ", ".join(WalletRow.__slots__)


@dataclass(frozen=True, slots=True)
class BalanceView:
    wallet_id: str
    balance_minor: int
    held_minor: int
    floor_minor: int
    available_minor: int
    debt_minor: int
    blocked: bool
    credit_code: str
    credit_scale: int
    unsettled_minor: int = 0

    @classmethod
    def of(cls, wallet: WalletRow) -> BalanceView:
        state = wallet.state
        return cls(wallet.id, wallet.balance_minor, wallet.held_minor, wallet.floor_minor, state.available_minor,
                   state.debt_minor, state.blocked, wallet.credit_code, wallet.credit_scale, wallet.unsettled_minor)


@dataclass(frozen=True, slots=True)
class AllocationRow:
    bucket_id: int | None  # None = the wallet's debt
    amount_minor: int
    bucket_source: str | None = None


@dataclass(frozen=True, slots=True)
class TransactionRow:
    id: int
    project_id: str
    wallet_id: str
    kind: str
    amount_minor: int
    balance_before_minor: int
    balance_after_minor: int
    idempotency_key: str
    source_ref: str | None
    related_transaction_id: int | None
    hold_id: str | None
    meter_id: str | None
    period_start: datetime | None
    price_version_id: str | None
    reason: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    allocations: tuple[AllocationRow, ...] = ()

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any], allocations: tuple[AllocationRow, ...] = ()) -> TransactionRow:
        fields = {name: row[name] for name in cls.__slots__ if name != "allocations"}
        return cls(**fields, allocations=allocations)


@dataclass(frozen=True, slots=True)
class BucketRow:
    id: int
    wallet_id: str
    project_id: str
    source: str
    priority: int
    granted_minor: int
    remaining_minor: int
    expires_at: datetime | None
    created_at: datetime
    source_ref: str | None
    expired_at: datetime | None

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> BucketRow:
        return cls(**{name: row[name] for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class HoldRow:
    id: str
    wallet_id: str
    project_id: str
    amount_minor: int
    status: Literal["active", "committed", "voided", "expired"]
    expires_at: datetime
    idempotency_key: str
    committed_transaction_id: int | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> HoldRow:
        return cls(**{name: row[name] for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class PostingResult:
    """``duplicate``: the idempotency key was used before for the same request; ``transaction`` is the
    original row and nothing new was written."""

    outcome: Literal["created", "duplicate"]
    transaction: TransactionRow


@dataclass(frozen=True, slots=True)
class CheckpointOutcome:
    status: Literal["applied", "stale"]
    source_topic: str
    partition: int
    applied_through: int  # after this call
    keys: int = 0
    transactions: int = 0
    charged_minor: int = 0  # net amount posted (positive = charged, negative = credited back)
    accrued_minor: int = 0  # net amount priced and left for the settle pass (ledger/settle.py)


@dataclass(frozen=True, slots=True)
class SnapshotCounter:
    wallet_id: str
    project_id: str
    meter_id: str
    period_start: datetime
    price_version_id: str
    partition: int
    units: Decimal
    latest_at: datetime | None
    events: int
    late_events: int
    charged_minor: int  # what the ledger has charged for the key as a whole (all partitions merged)


@dataclass(frozen=True, slots=True)
class PartitionSnapshot:
    """What streams seeds from on assignment: read in ONE repeatable-read snapshot."""

    source_topic: str
    applied_through: dict[int, int]  # partition -> offset (-1 = nothing applied yet)
    counters: tuple[SnapshotCounter, ...]
