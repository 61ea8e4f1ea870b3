"""Contracts the ledger owns: the charge checkpoint it consumes and the transaction event it emits.

Dependency-light on purpose (pydantic + stdlib): ``streams`` and ``analytics`` import this module, and
importing it must not pull in SQLAlchemy or Kafka clients.

Units and money:
- ``units`` are decimal strings (meters may SUM fractional values); they are never floats.
- every amount is an integer in minor units of the wallet's credit (``*_minor``).
- every time is a timezone-aware UTC datetime.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

__all__ = [
    "TOPIC_LEDGER_CHARGES",
    "TOPIC_LEDGER_TRANSACTIONS",
    "Aggregation",
    "ChargeCheckpoint",
    "CounterKey",
    "CounterValue",
    "PriceDecimal",
    "PriceModel",
    "PriceTier",
    "TransactionKind",
    "TransactionPosted",
    "Units",
]

TOPIC_LEDGER_CHARGES = "ledger.charges.v1"
TOPIC_LEDGER_TRANSACTIONS = "ledger.transactions.v1"

#: Units travel as decimal strings so no float ever touches a counter.
Units = Annotated[Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str)]


def _refuse_float(value: Any) -> Any:
    """Prices must arrive as strings or ints: a float ("0.1" → 0.1000000000000000055…) is already wrong."""
    if isinstance(value, float):
        raise ValueError("prices are decimal strings (e.g. \"0.4\"), never floats")
    return value


#: A price or unit boundary: Decimal in memory, a decimal string on the wire, floats refused.
PriceDecimal = Annotated[
    Decimal, BeforeValidator(_refuse_float), PlainSerializer(lambda d: format(d, "f"), return_type=str)
]

#: How the ledger merges one key's per-partition values into the units it prices (DESIGN §2.2):
#: sum / count → sum over partitions; max → max; latest → the value with the latest ``latest_at``;
#: unique_count → sum over partitions, exact only when every event of a distinct value stays in one
#: partition (true when the counted value is the partition key's subject, or under a wallet re-key).
Aggregation = Literal["sum", "count", "max", "latest", "unique_count"]


class PriceTier(BaseModel):
    """One tier of a graduated or volume price. Tier i covers units in (previous ``up_to``, ``up_to``];
    the last tier has ``up_to=None`` (unbounded). Prices are in minor units of the wallet's credit and
    may be fractional ("0.4" minor per unit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to: PriceDecimal | None = None
    unit_price_minor: PriceDecimal = Decimal(0)
    flat_price_minor: PriceDecimal = Decimal(0)


class PriceModel(BaseModel):
    """An immutable price version: a pure function of a period's cumulative units (see ledger/pricing.py).

    - ``per_unit``: units × ``unit_price_minor``.
    - ``package``: ceil(units / ``package_size``) × ``package_price_minor`` (a partial package is a package).
    - ``graduated``: each tier prices the slice of units inside it (+ its flat fee once the slice is
      non-empty); the total is the sum of the slices.
    - ``volume``: ALL units at the tier the total reached (+ that tier's flat fee). The price can fall when
      the total crosses into a cheaper tier; the ledger then posts a credit back (see ledger/README.md).
    - ``free_units``: the first ``free_units`` units of the period cost nothing (applied before any model).
    The cumulative price is floored to an integer minor amount; the ledger charges the difference between
    consecutive cumulative prices, so fractions are never lost or double-charged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Literal["per_unit", "package", "graduated", "volume"]
    unit_price_minor: PriceDecimal | None = None
    package_size: PriceDecimal | None = None
    package_price_minor: PriceDecimal | None = None
    tiers: tuple[PriceTier, ...] = ()
    free_units: PriceDecimal = Decimal(0)

    @model_validator(mode="after")
    def _consistent(self) -> PriceModel:
        if self.free_units < 0:
            raise ValueError("free_units must be >= 0")
        if self.model == "per_unit":
            _require(self, {"unit_price_minor"})
            assert self.unit_price_minor is not None
            _non_negative("unit_price_minor", self.unit_price_minor)
        elif self.model == "package":
            _require(self, {"package_size", "package_price_minor"})
            assert self.package_size is not None and self.package_price_minor is not None
            if self.package_size <= 0:
                raise ValueError("package_size must be > 0")
            _non_negative("package_price_minor", self.package_price_minor)
        else:
            _require(self, {"tiers"})
            _check_tiers(self.tiers)
        return self


_MODEL_FIELDS = ("unit_price_minor", "package_size", "package_price_minor", "tiers")


def _require(price: PriceModel, wanted: set[str]) -> None:
    for name in _MODEL_FIELDS:
        value = getattr(price, name)
        present = value is not None and value != ()
        if name in wanted and not present:
            raise ValueError(f"a {price.model} price needs {name}")
        if name not in wanted and present:
            raise ValueError(f"a {price.model} price does not take {name}")


def _non_negative(name: str, value: Decimal) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0")


def _check_tiers(tiers: tuple[PriceTier, ...]) -> None:
    previous = Decimal(0)
    for index, tier in enumerate(tiers):
        _non_negative("unit_price_minor", tier.unit_price_minor)
        _non_negative("flat_price_minor", tier.flat_price_minor)
        last = index == len(tiers) - 1
        if tier.up_to is None:
            if not last:
                raise ValueError("only the last tier may be unbounded (up_to=null)")
            continue
        if last:
            raise ValueError("the last tier must be unbounded (up_to=null)")
        if tier.up_to <= previous:
            raise ValueError("tier bounds (up_to) must be strictly increasing and > 0")
        previous = tier.up_to


#: Validated prices by the JSON value they came from. A checkpoint repeats its keys' price for every counter
#: (thousands per checkpoint, a handful of distinct prices); validating each copy was ~3 of the ~8 µs a counter cost
#: to decode. Exact: validation is a pure function of the input and a PriceModel is frozen, so equal inputs may share
#: one instance. The key is ``repr`` of the parsed value, which tells apart every JSON value (1 / 1.0 / "1" / inf /
#: None): serializing it back with orjson would not (a float beyond range parses as inf and orjson writes inf as
#: null, so a refused price could hit a valid one's entry). Bounded: cleared when full.
_VALIDATED_PRICES: dict[str, PriceModel] = {}
_VALIDATED_PRICES_MAX = 4_096


def _validate_price_once(value: Any, handler: ValidatorFunctionWrapHandler) -> PriceModel:
    if not isinstance(value, dict):  # a PriceModel built in Python, or input the handler will refuse
        built: PriceModel = handler(value)
        return built
    parsed = repr(value)
    price = _VALIDATED_PRICES.get(parsed)
    if price is None:
        price = handler(value)  # raises on bad input: nothing is cached then
        if len(_VALIDATED_PRICES) >= _VALIDATED_PRICES_MAX:
            _VALIDATED_PRICES.clear()
        _VALIDATED_PRICES[parsed] = price
    return price


#: A price as a counter carries it: validated once per distinct parsed value.
CounterPrice = Annotated[PriceModel, WrapValidator(_validate_price_once)]


class TransactionKind(StrEnum):
    TOP_UP = "top_up"
    USAGE = "usage"
    DEBIT = "debit"
    REFUND = "refund"
    BONUS = "bonus"
    PROMO = "promo"
    SUBSCRIPTION_GRANT = "subscription_grant"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"
    RESERVATION_COMMIT = "reservation_commit"


class CounterKey(BaseModel):
    """Identity of one cumulative usage counter: what the ledger prices as a whole."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wallet_id: str
    project_id: str
    meter_id: str
    period_start: AwareDatetime
    price_version_id: str


class CounterValue(BaseModel):
    """The cumulative state of a counter as seen by ONE source partition, as of the checkpoint's offset.

    ``units`` is the meter's aggregate over every event of this key that the partition has accepted in the
    period (SUM/COUNT: running sum; MAX: running max; LATEST: value of the latest event, with its time;
    UNIQUE_COUNT: distinct values seen). The ledger merges the partitions' values and prices the total."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: CounterKey
    units: Units
    price: CounterPrice = Field(description="the key's price version (immutable per price_version_id)")
    aggregation: Aggregation = Field(default="sum", description="how the ledger merges partitions' values")
    latest_at: AwareDatetime | None = None
    events: int = Field(ge=0, description="events counted into this value (cumulative)")
    late_events: int = Field(default=0, ge=0, description="of which arrived after the allowed lateness")
    meter_version: int = Field(default=1, ge=1, description=(
        "the meter's counting version: keys of one (wallet, meter, period) carry allowance and tier position "
        "over from earlier price versions only within the same counting version"))
    price_effective_from: AwareDatetime | None = Field(default=None, description=(
        "when the key's price version took effect. Set: the key continues the period's cumulative units of the "
        "keys of the same (wallet, meter, period, meter_version) whose price versions took effect earlier "
        "(ledger/checkpoints.py, 'price versions continue'). None (older producers): priced on its own"))


class ChargeCheckpoint(BaseModel):
    """"For source partition ``partition``, as of offset ``as_of_offset``, these counters stand at these
    cumulative values."

    The ledger applies it only if ``as_of_offset > applied_through[source_topic, partition]``; a stale or
    repeated checkpoint is a no-op (DESIGN §2.2). ``counters`` lists only the keys that changed since the
    previous checkpoint of the same partition, but each value is cumulative, never a delta."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_topic: str
    partition: int = Field(ge=0)
    as_of_offset: int = Field(ge=0)
    counters: list[CounterValue]
    dedupe_keys: list[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]] = Field(
        default_factory=list,
        description="SIGNED 64-bit hashes (PostgreSQL bigint) of the (project, source, id) identities "
        "accepted in this checkpoint, e.g. int.from_bytes(blake2b(...,digest_size=8).digest(), signed=True)",
    )
    emitted_at: AwareDatetime
    stream_time: AwareDatetime | None = Field(default=None, description=(
        "the newest arrival (Kafka message timestamp) the partition's worker had seen as of this checkpoint; "
        "stored with the dedupe keys so the next owner measures the dedupe horizon in stream time"))
    owner_epoch: int = Field(
        default=0, ge=0, le=2**63 - 1,
        description="the fencing epoch its worker took when it seeded the partition (ledger/fencing.py); the "
        "ledger refuses a checkpoint whose epoch is older than the partition's (DESIGN §2 invariant 11). "
        "0 = a worker from before fencing (refused once any owner took an epoch)",
    )


class TransactionPosted(BaseModel):
    """Emitted (through the outbox, after commit) for every transaction row the ledger writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transaction_id: int
    project_id: str
    wallet_id: str
    kind: TransactionKind
    amount_minor: int
    balance_before_minor: int
    balance_after_minor: int
    idempotency_key: str
    source_ref: str | None = None
    meter_id: str | None = None
    bucket_source: str | None = None
    created_at: datetime
    # Added by ledger_0001 (optional, so older readers keep working):
    related_transaction_id: int | None = Field(default=None, description="refund -> the debit it refunds")
    period_start: datetime | None = None
    price_version_id: str | None = None
    reason: str | None = None
    debt_settled_minor: int = Field(default=0, ge=0, description="of a credit, the part that repaid debt")
