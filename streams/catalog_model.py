"""The catalog as plain, immutable data: what the worker's pure core (streams/metering.py) reads.

``streams/catalog.py`` loads it from PostgreSQL (``load_catalog``); tests build it directly. Nothing here
does I/O, so the metering rules are testable without a database.

Invariants:
- a ``PriceVersion`` is immutable: the same ``id`` always carries the same ``PriceModel`` and period;
- a meter's identity (``Meter.id``) is stable across its versions; counters and charges use it;
- ``meters_by_type`` holds only the CURRENT (latest, not archived) version of each meter.
"""

from __future__ import annotations

import bisect
import functools
import uuid
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from ledger.contracts import Aggregation, PriceModel
from ledger.limits import price_units_max

__all__ = [
    "AGGREGATIONS",
    "CatalogSnapshot",
    "Filter",
    "Meter",
    "PeriodGranularity",
    "PriceVersion",
    "ProjectPolicy",
    "UnknownSubjects",
    "auto_wallet_id",
    "counter_version_id",
    "parse_path",
    "provisioned_wallet_id",
]

AGGREGATIONS: tuple[str, ...] = ("SUM", "COUNT", "MAX", "UNIQUE_COUNT", "LATEST")
PeriodGranularity = Literal["month", "day"]
UnknownSubjects = Literal["auto_provision", "dead_letter"]

#: Namespace of auto-provisioned wallet ids: uuid5(namespace, project + NUL + subject). Never change it —
#: the same (project, subject) must map to the same wallet in every process, forever.
WALLET_NAMESPACE = uuid.UUID("6f1c2b9e-4d4a-5c1e-9b7a-3e0d5a8c7f21")


@functools.lru_cache(maxsize=262_144)  # on the per-event path: uuid5 + str cost ~8 µs
def auto_wallet_id(project_id: str, subject: str, generation: int = 0) -> str:
    """The deterministic wallet of an unknown subject (``unknown_subjects = auto_provision``).

    ``generation`` counts the subject's erased accounts: generation 0 is ``uuid5(project NUL subject)`` (every id
    provisioned before erasure existed), generation n > 0 appends ``NUL n``. Use ``provisioned_wallet_id`` to
    pick the generation: the first whose wallet is not retired by an erasure."""
    suffix = f"\x00{generation}" if generation else ""
    return str(uuid.uuid5(WALLET_NAMESPACE, f"{project_id}\x00{subject}{suffix}"))


def provisioned_wallet_id(project_id: str, subject: str, retired: Container[str]) -> str:
    """The wallet usage of a subject without a subject key is charged to: its first generation whose wallet was
    not retired by an account erasure (``wallets.erased_at``). An erased subject that comes back gets a fresh
    wallet; the erased one stays closed and is never charged again (its id is retired for good)."""
    generation = 0
    while (wallet := auto_wallet_id(project_id, subject, generation)) in retired:
        generation += 1
    return wallet


PathStep = str | int


def counter_version_id(price_version_id: str, counting_version: int) -> str:
    """The counter key's ``price_version_id`` field: the price version, and the meter's counting version
    when it is past 1 (``pv_x@m3``). Folded into this field rather than a new key column because the field
    already names "the regime these units are charged under" and the ledger treats it as opaque: no change
    to the ledger's keys, tables or idempotency keys, and every counter written before stays what it was
    (counting version 1 = the bare price version id). See streams/README "Catalog changes"."""
    return price_version_id if counting_version == 1 else f"{price_version_id}@m{counting_version}"


def parse_path(path: str) -> tuple[PathStep, ...]:
    """``$.usage.input_tokens`` / ``$.items[0].n`` / ``tokens`` → steps applied to the event's ``data``.

    A deliberately small JSON-path subset (what OpenMeter meters use): dotted keys and [index]."""
    text = path.strip()
    if text.startswith("$"):
        text = text[1:]
    text = text.lstrip(".")
    if not text:
        raise ValueError(f"empty JSON path {path!r}")
    steps: list[PathStep] = []
    for part in text.split("."):
        if not part:
            raise ValueError(f"bad JSON path {path!r}")
        name, _, rest = part.partition("[")
        if name:
            steps.append(name)
        while rest:
            index_text, sep, rest = rest.partition("]")
            if not sep or not index_text.isdigit():
                raise ValueError(f"bad JSON path {path!r}")
            steps.append(int(index_text))
            rest = rest.removeprefix("[")
    return tuple(steps)


_MISSING = object()


def read_path(data: Any, steps: tuple[PathStep, ...]) -> Any:
    """The value at ``steps`` inside ``data``, or ``_MISSING``."""
    value = data
    for step in steps:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                return _MISSING
            value = value[step]
        else:
            if not isinstance(value, dict):
                return _MISSING
            value = value.get(step, _MISSING)
            if value is _MISSING:
                return _MISSING
    return value


MISSING = _MISSING


@dataclass(frozen=True, slots=True)
class Filter:
    """An event matches when the value at ``path`` (in ``data``) equals one of ``values``."""

    property: str
    values: tuple[Any, ...]
    steps: tuple[PathStep, ...] = ()

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> Filter:
        prop = str(spec["property"])
        if "equals" in spec:
            values: tuple[Any, ...] = (spec["equals"],)
        elif "in" in spec and isinstance(spec["in"], list):
            values = tuple(spec["in"])
        else:
            raise ValueError("a filter needs 'equals' or 'in' (a list)")
        return cls(prop, values, parse_path(prop))

    def to_json(self) -> dict[str, Any]:
        if len(self.values) == 1:
            return {"property": self.property, "equals": self.values[0]}
        return {"property": self.property, "in": list(self.values)}

    def matches(self, data: Any) -> bool:
        value = read_path(data, self.steps)
        return value is not _MISSING and value in self.values


@dataclass(frozen=True, slots=True)
class Meter:
    """How events of ``event_type`` become units. ``value_property`` is None only for COUNT."""

    id: str
    project_id: str
    slug: str
    event_type: str
    aggregation: str  # one of AGGREGATIONS
    value_property: str | None
    filters: tuple[Filter, ...] = ()
    group_by: tuple[str, ...] = ()
    version: int = 1
    value_steps: tuple[PathStep, ...] = ()
    #: the version at which the current definition of units started (streams/catalog.py COUNTING_FIELDS)
    counting_version: int = 1

    @property
    def ledger_aggregation(self) -> Aggregation:
        return self.aggregation.lower()  # type: ignore[return-value]

    def matches(self, data: Any) -> bool:
        return all(f.matches(data) for f in self.filters)


@dataclass(frozen=True, slots=True)
class PriceVersion:
    id: str
    price_id: str
    meter_id: str
    project_id: str
    version: int
    model: PriceModel
    period: PeriodGranularity
    effective_from: datetime
    #: the model as JSON-ready data, serialized once (checkpoints embed it for every counter)
    model_json: dict[str, Any] = field(default_factory=dict, compare=False)
    #: a key's cumulative units may not exceed this (``ledger.limits.price_units_max``: the price stays
    #: below AMOUNT_MINOR_MAX); computed once here because the worker checks it per event
    units_max: Decimal = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units_max", price_units_max(self.model))


@dataclass(frozen=True, slots=True)
class ProjectPolicy:
    unknown_subjects: UnknownSubjects
    allowed_lateness_s: int


@dataclass(frozen=True)
class CatalogSnapshot:
    """Everything the worker needs to meter an event, indexed for the hot path."""

    meters_by_type: dict[tuple[str, str], tuple[Meter, ...]]
    #: meter id -> its price versions sorted by effective_from (ascending)
    prices_by_meter: dict[str, tuple[PriceVersion, ...]]
    wallets_by_subject: dict[tuple[str, str], str]
    policies: dict[str, ProjectPolicy]
    default_policy: ProjectPolicy
    loaded_at: datetime | None = None
    #: wallets account erasure retired: auto-provisioning skips their ids (``provisioned_wallet_id``)
    retired_wallets: frozenset[str] = frozenset()
    _starts: dict[str, list[datetime]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, *, meters: list[Meter], price_versions: list[PriceVersion],
              subject_keys: dict[tuple[str, str], str], policies: dict[str, ProjectPolicy],
              default_policy: ProjectPolicy, loaded_at: datetime | None = None,
              retired_wallets: frozenset[str] = frozenset()) -> CatalogSnapshot:
        by_type: dict[tuple[str, str], list[Meter]] = {}
        for meter in meters:
            by_type.setdefault((meter.project_id, meter.event_type), []).append(meter)
        by_meter: dict[str, list[PriceVersion]] = {}
        for pv in price_versions:
            by_meter.setdefault(pv.meter_id, []).append(pv)
        prices = {m: tuple(sorted(v, key=lambda p: (p.effective_from, p.version))) for m, v in by_meter.items()}
        return cls(
            meters_by_type={k: tuple(v) for k, v in by_type.items()},
            prices_by_meter=prices,
            wallets_by_subject=dict(subject_keys),
            policies=dict(policies),
            default_policy=default_policy,
            loaded_at=loaded_at,
            retired_wallets=retired_wallets,
            _starts={m: [p.effective_from for p in v] for m, v in prices.items()},
        )

    def auto_wallet(self, project_id: str, subject: str) -> str:
        """The wallet of a subject without a subject key (generation 0 unless an erasure retired it)."""
        wallet = auto_wallet_id(project_id, subject)
        if not self.retired_wallets or wallet not in self.retired_wallets:
            return wallet
        return provisioned_wallet_id(project_id, subject, self.retired_wallets)

    def policy(self, project_id: str) -> ProjectPolicy:
        return self.policies.get(project_id, self.default_policy)

    def price_at(self, meter_id: str, at: datetime) -> PriceVersion | None:
        """The version in effect at ``at``; before the first version, the first one (a meter's first
        price covers its earlier usage rather than leaving it unpriced). None = the meter has no price."""
        versions = self.prices_by_meter.get(meter_id)
        if not versions:
            return None
        if len(versions) == 1:
            return versions[0]
        index = bisect.bisect_right(self._starts[meter_id], at) - 1
        return versions[max(index, 0)]
