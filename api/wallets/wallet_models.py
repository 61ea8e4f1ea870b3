"""Request and response bodies of the wallet routes (amounts are integers in minor units, datetimes UTC)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, IPvAnyAddress, model_validator

from api.validation import RequestModel, StrictInt
from api.wallets.wallet_directory import WalletEntry
from ledger.postings import WalletBalance
from ledger.rows import AllocationRow, BalanceView, BucketRow, HoldRow, TransactionRow, WalletRow

AMOUNT = Field(gt=0, le=10**15, description="credits in minor units (an integer)")
REF = Field(default=None, max_length=200, description="your reference (job id, request id...)")


# ------------------------------------------------------------------------------------------------ outputs


class BalanceOut(BaseModel):
    balance_minor: int = Field(description="sum of all postings; negative = debt")
    held_minor: int = Field(description="reserved by active holds")
    floor_minor: int = Field(description="synchronous debits never go below this")
    unsettled_minor: int = Field(default=0, description="usage metered and priced but not posted as a transaction "
                                                        "yet (LEDGER_USAGE_SETTLE_INTERVAL_S); already counted as spent")
    available_minor: int = Field(description="balance - unsettled - held - floor, never below 0")
    debt_minor: int = Field(description="max(unsettled - balance, 0)")
    blocked: bool = Field(description="true while in debt: new debits and reservations are refused")

    @classmethod
    def of(cls, b: BalanceView | WalletBalance) -> BalanceOut:
        return cls(balance_minor=b.balance_minor, held_minor=b.held_minor, floor_minor=b.floor_minor,
                   unsettled_minor=b.unsettled_minor, available_minor=b.available_minor, debt_minor=b.debt_minor,
                   blocked=b.blocked)


class WalletOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "w_5f0c...", "project_id": "prj_0123456789abcdef", "owner_kind": "user", "owner_ref": "usr_0a1b2c",
        "credit_code": "credits", "credit_scale": 0, "created_at": "2026-01-01T00:00:00Z",
        "balance": {"balance_minor": 1200, "held_minor": 100, "floor_minor": 0, "unsettled_minor": 0, "available_minor": 1100,
                    "debt_minor": 0, "blocked": False}}]})
    id: str
    project_id: str
    owner_kind: str
    owner_ref: str
    credit_code: str
    credit_scale: int
    created_at: datetime
    balance: BalanceOut
    closed_at: datetime | None = Field(default=None, description="set while the end user's account erasure is "
                                                                 "pending or done: no new debits or grants")

    @classmethod
    def of(cls, w: WalletRow) -> WalletOut:
        return cls(id=w.id, project_id=w.project_id, owner_kind=w.owner_kind, owner_ref=w.owner_ref,
                   credit_code=w.credit_code, credit_scale=w.credit_scale, created_at=w.created_at,
                   balance=BalanceOut.of(BalanceView.of(w)), closed_at=w.closed_at)


class BonusOut(BaseModel):
    granted_minor: int = Field(description="credits granted (0 = refused; see reason)")
    reason: str = Field(description="granted, not_configured, disabled, country_zero, no_amount, device_seen, "
                                    "device_id_required, ip_network_limit or existing_wallet")
    detail: str = Field(description="the reason in words")
    country: str | None = Field(description="the country the amount was chosen for (None = unknown: default)")
    country_source: str | None = Field(description="explicit, geoip or none")
    expires_at: datetime | None = Field(description="when the bonus credits expire")
    transaction_id: int | None = Field(description="the ledger's bonus transaction")


class WalletCreatedOut(WalletOut):
    """A created (201) or existing (200) wallet; subject wallets carry the sign-up bonus decision."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "9b1c...", "project_id": "prj_0123456789abcdef", "owner_kind": "subject", "owner_ref": "customer-882",
        "credit_code": "credits", "credit_scale": 0, "created_at": "2026-01-01T00:00:00Z",
        "balance": {"balance_minor": 500, "held_minor": 0, "floor_minor": 0, "unsettled_minor": 0, "available_minor": 500,
                    "debt_minor": 0, "blocked": False},
        "bonus": {"granted_minor": 500, "reason": "granted", "detail": "the bonus was granted", "country": "GB",
                  "country_source": "explicit", "expires_at": "2026-01-31T00:00:00Z", "transaction_id": 77}}]})
    bonus: BonusOut | None = Field(default=None, description="subject wallets only; None elsewhere")


class WalletListItemOut(WalletOut):
    """A wallet in the list, with who it is for (see api.wallets.wallet_directory)."""

    owner_email: str | None = Field(default=None, description="user wallets: the member's email")
    subject: str | None = Field(default=None, description="subject wallets: the end user (subject) it pays for; "
                                "for an auto-provisioned wallet found from a subject key or the usage seen, "
                                "None if unknown")
    auto_provisioned: bool = Field(default=False, description="created by the ledger from usage of an unknown "
                                                              "subject")

    @classmethod
    def of_entry(cls, e: WalletEntry) -> WalletListItemOut:
        return cls(**WalletOut.of(e.wallet).model_dump(), owner_email=e.owner_email, subject=e.subject,
                   auto_provisioned=e.auto_provisioned)


class WalletListPage(BaseModel):
    items: list[WalletListItemOut]
    next_cursor: str | None


class AllocationOut(BaseModel):
    bucket_id: int | None = Field(description="None = the wallet's debt")
    amount_minor: int = Field(description="negative = burned from the bucket, positive = granted to it")
    bucket_source: str | None

    @classmethod
    def of(cls, a: AllocationRow) -> AllocationOut:
        return cls(bucket_id=a.bucket_id, amount_minor=a.amount_minor, bucket_source=a.bucket_source)


class TransactionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 981, "wallet_id": "w_5f0c...", "kind": "debit", "amount_minor": -5, "balance_before_minor": 1200,
        "balance_after_minor": 1195, "idempotency_key": "api:prj_0123456789abcdef:job-77", "source_ref": "job-77",
        "related_transaction_id": None, "hold_id": None, "meter_id": None, "reason": None,
        "metadata": {"feature_key": "image_to_image"}, "created_at": "2026-01-01T00:00:00Z",
        "allocations": [{"bucket_id": 12, "amount_minor": -5, "bucket_source": "top_up"}]}]})
    id: int
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
    price_version_id: str | None = Field(description=(
        "usage: the price version the units were charged under; `{price_version_id}@m{n}` when the meter's "
        "counting version n is past 1 (a meter edit that changed how units are counted started new counters)"))
    reason: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    allocations: list[AllocationOut]

    @classmethod
    def of(cls, t: TransactionRow) -> TransactionOut:
        return cls(id=t.id, wallet_id=t.wallet_id, kind=t.kind, amount_minor=t.amount_minor,
                   balance_before_minor=t.balance_before_minor, balance_after_minor=t.balance_after_minor,
                   idempotency_key=t.idempotency_key, source_ref=t.source_ref,
                   related_transaction_id=t.related_transaction_id, hold_id=t.hold_id, meter_id=t.meter_id,
                   period_start=t.period_start, price_version_id=t.price_version_id, reason=t.reason,
                   metadata=t.metadata, created_at=t.created_at,
                   allocations=[AllocationOut.of(a) for a in t.allocations])


class TransactionPageOut(BaseModel):
    items: list[TransactionOut]
    next_cursor: str | None


class BucketOut(BaseModel):
    id: int
    source: str
    priority: int = Field(description="lower burns first")
    granted_minor: int
    remaining_minor: int
    expires_at: datetime | None
    created_at: datetime
    source_ref: str | None
    expired_at: datetime | None

    @classmethod
    def of(cls, b: BucketRow) -> BucketOut:
        return cls(id=b.id, source=b.source, priority=b.priority, granted_minor=b.granted_minor,
                   remaining_minor=b.remaining_minor, expires_at=b.expires_at, created_at=b.created_at,
                   source_ref=b.source_ref, expired_at=b.expired_at)


class HoldOut(BaseModel):
    id: str
    wallet_id: str
    amount_minor: int
    status: str
    expires_at: datetime
    committed_transaction_id: int | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, h: HoldRow) -> HoldOut:
        return cls(id=h.id, wallet_id=h.wallet_id, amount_minor=h.amount_minor, status=h.status,
                   expires_at=h.expires_at, committed_transaction_id=h.committed_transaction_id,
                   created_at=h.created_at, updated_at=h.updated_at)


class PostingOut(BaseModel):
    """The result of a money operation: the ledger transaction and the wallet's balance right after it."""

    outcome: Literal["created", "duplicate"]
    transaction: TransactionOut
    balance: BalanceOut


class HoldResultOut(BaseModel):
    hold: HoldOut
    balance: BalanceOut


class CommitOut(BaseModel):
    hold_id: str
    transaction: TransactionOut
    balance: BalanceOut


# ------------------------------------------------------------------------------------------------- inputs


class SignupFacts(BaseModel):
    """What your backend knows about the end user signing up (for the sign-up bonus; all optional). Send the
    USER's IP and device, not your backend's: Meterline only sees your server's address."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"country": "US", "ip": "203.0.113.7", "device_id": "idfv-5E1C7A2B"}]})
    country: str | None = Field(default=None, pattern=r"^[A-Za-z]{2}$",
                                description="ISO 3166-1 alpha-2 (e.g. US, GB); wins over GeoIP")
    ip: IPvAnyAddress | None = Field(default=None, description="the end user's IP (GeoIP country, IP-network limit)")
    device_id: str | None = Field(default=None, min_length=1, max_length=200,
                                  description="a stable device id (IDFV, Android ID...); only a keyed hash is stored")


class WalletCreate(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"owner_kind": "user", "owner_ref": "usr_0a1b2c"}, {"owner_kind": "project"},
        {"owner_kind": "subject", "owner_ref": "customer-881", "credit_scale": 2, "credit_code": "usd_credits"},
        {"owner_kind": "subject", "owner_ref": "customer-882",
         "signup": {"country": "GB", "ip": "203.0.113.7", "device_id": "idfv-5E1C7A2B"}}]})
    owner_kind: Literal["user", "project", "subject"]
    owner_ref: str | None = Field(default=None, max_length=200,
                                  description="user: a member's user id; subject: your customer id; "
                                              "project: omitted (the project itself)")
    credit_code: str = Field(default="credits", pattern=r"^[a-z0-9_]{1,32}$")
    credit_scale: int = Field(default=0, ge=0, le=18, description="decimal places of one credit")
    floor_minor: StrictInt | None = Field(default=None, ge=-10**15, le=10**15,
                                    description="negative allows an overdraft for synchronous debits")
    signup: SignupFacts | None = Field(default=None, description="subject wallets: the end user's sign-up facts "
                                                                 "for the project's sign-up bonus")

    @model_validator(mode="after")
    def _ref(self) -> WalletCreate:
        if self.owner_kind != "project" and not self.owner_ref:
            raise ValueError("owner_ref is required for user and subject wallets")
        if self.signup is not None and self.owner_kind != "subject":
            raise ValueError("signup applies to subject wallets (your end users) only; drop it or use "
                             "owner_kind 'subject'")
        return self


class WalletPatch(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"floor_minor": -500}]})
    floor_minor: StrictInt = Field(ge=-10**15, le=10**15)


class _ByAmountOrFeature(RequestModel):
    amount_minor: StrictInt | None = Field(default=None, gt=0, le=10**15)
    feature_key: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.:-]{0,99}$",
                                    description="charge the feature's configured cost instead of an amount")
    quantity: StrictInt = Field(default=1, ge=1, le=1_000_000, description="uses of the feature (with feature_key)")

    @model_validator(mode="after")
    def _one_of(self) -> Any:
        if (self.amount_minor is None) == (self.feature_key is None):
            raise ValueError("give exactly one of amount_minor or feature_key")
        if self.amount_minor is not None and self.quantity != 1:
            raise ValueError("quantity applies to feature_key only")
        return self


class DebitRequest(_ByAmountOrFeature):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"feature_key": "image_to_image", "source_ref": "job-77"},
        {"amount_minor": 25, "source_ref": "req-9", "metadata": {"model": "large"}}]})
    source_ref: str | None = REF
    metadata: dict[str, Any] | None = None


class ReserveRequest(_ByAmountOrFeature):
    model_config = ConfigDict(json_schema_extra={"examples": [{"amount_minor": 100, "timeout_s": 300}]})
    timeout_s: int = Field(default=300, ge=1, le=7 * 24 * 3600, description="released automatically after this")


class CommitRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"amount_minor": 80}]})
    amount_minor: StrictInt = Field(ge=0, le=10**15, description="the actual cost (may differ from the hold)")
    metadata: dict[str, Any] | None = None


class RefundRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"reason": "generation failed at the vendor"}, {"amount_minor": 2, "reason": "partial failure"}]})
    amount_minor: StrictInt | None = Field(default=None, gt=0, le=10**15,
                                     description="omit to refund everything not yet refunded")
    reason: str = Field(min_length=1, max_length=500)


class GrantRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"amount_minor": 1000, "kind": "top_up", "source_ref": "manual-topup-1"},
        {"amount_minor": 200, "kind": "promo", "priority": 5, "expires_at": "2026-12-31T23:59:59Z",
         "reason": "launch promo"}]})
    amount_minor: StrictInt = AMOUNT
    kind: Literal["top_up", "bonus", "promo", "subscription_grant"] = "top_up"
    source: Literal["top_up", "subscription", "bonus", "refund", "promo", "adjustment"] | None = Field(
        default=None, description="the bucket's source (defaults from kind)")
    priority: StrictInt | None = Field(default=None, ge=-1_000_000, le=1_000_000, description="lower burns first")
    expires_at: AwareDatetime | None = None
    source_ref: str | None = REF
    reason: str | None = Field(default=None, max_length=500)


class AdjustmentRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"amount_minor": -300, "reason": "charge-back of top-up ch_123"}]})
    amount_minor: StrictInt = Field(ge=-10**15, le=10**15, description="signed: positive credits, negative debits "
                                                                 "(may create debt)")
    reason: str = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _nonzero(self) -> AdjustmentRequest:
        if self.amount_minor == 0:
            raise ValueError("an adjustment of 0 changes nothing")
        return self
