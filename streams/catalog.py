"""The catalog in PostgreSQL: meters (versioned), prices (immutable versions), subject keys, project settings.

Every function takes a SQLAlchemy ``Connection`` inside the caller's transaction and keyword arguments;
the caller commits. ``load_catalog`` turns the current rows into the pure ``CatalogSnapshot`` the worker
meters with; ``catalog_revision`` is the cheap probe the worker polls to know when to reload.

Invariants (see the streams_0001 migration for what the database enforces itself):
- updating a meter never rewrites history: version n is marked superseded and version n+1 inserted;
- a price version is never changed; a new version starts at its ``effective_from``, later than the last;
- a subject maps to one wallet; unmapped subjects follow the project's ``unknown_subjects`` policy.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from ledger import queries as ledger_queries
from ledger.contracts import PriceModel
from ledger.limits import AMOUNT_MINOR_MAX, price_units_max
from streams.catalog_model import (
    AGGREGATIONS,
    CatalogSnapshot,
    Filter,
    Meter,
    PriceVersion,
    ProjectPolicy,
    parse_path,
    provisioned_wallet_id,
)
from streams.errors import (
    CatalogConflict,
    CatalogInvalid,
    MeterNotFound,
    PriceNotFound,
    SubjectKeyNotFound,
    WalletNotFound,
)

__all__ = [
    "MeterRow",
    "PriceRow",
    "PriceVersionRow",
    "ProjectSettingsRow",
    "SubjectKeyRow",
    "add_price_version",
    "archive_meter",
    "archive_price",
    "bump_revision",
    "catalog_revision",
    "create_meter",
    "create_price",
    "delete_subject_key",
    "get_meter",
    "get_price",
    "get_project_settings",
    "list_meters",
    "list_prices",
    "list_subject_keys",
    "load_catalog",
    "meter_history",
    "provisioned_wallet",
    "set_project_settings",
    "set_subject_key",
    "update_meter",
]

#: what a meter's units mean: changing one of these starts a new counting version (new counters)
COUNTING_FIELDS = ("event_type", "aggregation", "value_property", "filters")
SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
PERIODS = ("month", "day")
UNKNOWN_SUBJECTS = ("auto_provision", "dead_letter")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


# -- rows --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MeterRow:
    id: str
    version: int
    project_id: str
    slug: str
    name: str | None
    description: str | None
    event_type: str
    aggregation: str
    value_property: str | None
    filters: list[dict[str, Any]]
    group_by: list[str]
    created_at: datetime
    superseded_at: datetime | None
    archived_at: datetime | None
    #: the version at which the current definition of units started (streams_0002): counters are per it
    counting_version: int

    @classmethod
    def of(cls, row: Mapping[str, Any] | Any) -> MeterRow:
        return cls(**{name: row[name] for name in cls.__slots__})

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class PriceVersionRow:
    id: str
    price_id: str
    version: int
    model: dict[str, Any]
    period: str
    effective_from: datetime
    created_at: datetime

    @classmethod
    def of(cls, row: Mapping[str, Any] | Any) -> PriceVersionRow:
        return cls(**{name: row[name] for name in cls.__slots__})

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class PriceRow:
    id: str
    project_id: str
    meter_id: str
    created_at: datetime
    archived_at: datetime | None
    versions: tuple[PriceVersionRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "project_id": self.project_id, "meter_id": self.meter_id,
                "created_at": self.created_at, "archived_at": self.archived_at,
                "versions": [v.to_json() for v in self.versions]}


@dataclass(frozen=True, slots=True)
class SubjectKeyRow:
    project_id: str
    subject: str
    wallet_id: str
    created_at: datetime

    @classmethod
    def of(cls, row: Mapping[str, Any] | Any) -> SubjectKeyRow:
        return cls(**{name: row[name] for name in cls.__slots__})

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class ProjectSettingsRow:
    project_id: str
    unknown_subjects: str
    allowed_lateness_s: int

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


# -- validation --------------------------------------------------------------------------------------------

def _check_meter(*, slug: str, event_type: str, aggregation: str, value_property: str | None,
                 filters: list[dict[str, Any]], group_by: list[str]) -> None:
    if not SLUG.match(slug):
        raise CatalogInvalid(f"slug {slug!r} must match {SLUG.pattern}")
    if not event_type or len(event_type) > 256:
        raise CatalogInvalid("event_type must be 1..256 characters")
    if aggregation not in AGGREGATIONS:
        raise CatalogInvalid(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
    if aggregation != "COUNT" and not value_property:
        raise CatalogInvalid(f"a {aggregation} meter needs value_property (a JSON path such as $.tokens)")
    try:
        if value_property:
            parse_path(value_property)
        for spec in filters:
            Filter.from_json(spec)
        for path in group_by:
            parse_path(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise CatalogInvalid(f"bad JSON path or filter: {exc}") from exc


def _price_model(model: PriceModel | Mapping[str, Any]) -> PriceModel:
    if isinstance(model, PriceModel):
        checked = model
    else:
        try:
            checked = PriceModel.model_validate(dict(model))
        except ValidationError as exc:
            raise CatalogInvalid(f"invalid price model: {exc.errors()[0]['msg']}") from exc
    if price_units_max(checked) < 1:
        raise CatalogInvalid(f"one unit may cost more than the ledger's bound of {AMOUNT_MINOR_MAX} minor units")
    return checked


# -- meters ------------------------------------------------------------------------------------------------

_METER_COLUMNS = ("id, version, project_id, slug, name, description, event_type, aggregation, value_property, "
                  "filters, group_by, created_at, superseded_at, archived_at, counting_version")

_INSERT_METER = text(f"""
    INSERT INTO meters (id, version, project_id, slug, name, description, event_type, aggregation, value_property,
                        filters, group_by, counting_version)
    VALUES (:id, :version, :project_id, :slug, :name, :description, :event_type, :aggregation, :value_property,
            CAST(:filters AS jsonb), CAST(:group_by AS jsonb), :counting_version)
    RETURNING {_METER_COLUMNS}
""")


def create_meter(conn: Connection, *, project_id: str, slug: str, event_type: str, aggregation: str,
                 value_property: str | None = None, filters: list[dict[str, Any]] | None = None,
                 group_by: list[str] | None = None, name: str | None = None,
                 description: str | None = None) -> MeterRow:
    filters, group_by = list(filters or []), list(group_by or [])
    aggregation = aggregation.upper()
    _check_meter(slug=slug, event_type=event_type, aggregation=aggregation, value_property=value_property,
                 filters=filters, group_by=group_by)
    return _insert_meter(conn, {
        "id": _new_id("mtr"), "version": 1, "counting_version": 1, "project_id": project_id, "slug": slug, "name": name,
        "description": description, "event_type": event_type, "aggregation": aggregation,
        "value_property": value_property if aggregation != "COUNT" else value_property or None,
        "filters": orjson.dumps(filters).decode(), "group_by": orjson.dumps(group_by).decode()})


def _insert_meter(conn: Connection, params: dict[str, Any]) -> MeterRow:
    try:
        with conn.begin_nested():
            row = conn.execute(_INSERT_METER, params).mappings().one()
    except IntegrityError as exc:
        raise CatalogConflict(f"project {params['project_id']} already has a meter {params['slug']!r}") from exc
    return MeterRow.of(row)


def _current_meter(conn: Connection, project_id: str, meter: str, *, lock: bool = False) -> MeterRow:
    """By id or slug; the current version (archived meters included, so they can be shown)."""
    row = conn.execute(text(f"""
        SELECT {_METER_COLUMNS} FROM meters
        WHERE project_id = :p AND superseded_at IS NULL AND (id = :m OR slug = :m)
        ORDER BY archived_at NULLS FIRST LIMIT 1 {'FOR UPDATE' if lock else ''}
    """), {"p": project_id, "m": meter}).mappings().one_or_none()
    if row is None:
        raise MeterNotFound(f"no meter {meter!r} in project {project_id}")
    return MeterRow.of(row)


def get_meter(conn: Connection, *, project_id: str, meter: str) -> MeterRow:
    return _current_meter(conn, project_id, meter)


def list_meters(conn: Connection, *, project_id: str, include_archived: bool = False) -> list[MeterRow]:
    rows = conn.execute(text(f"""
        SELECT {_METER_COLUMNS} FROM meters WHERE project_id = :p AND superseded_at IS NULL
          AND (:all OR archived_at IS NULL)
        ORDER BY slug, created_at
    """), {"p": project_id, "all": include_archived}).mappings().all()
    return [MeterRow.of(r) for r in rows]


def meter_history(conn: Connection, *, project_id: str, meter: str) -> list[MeterRow]:
    current = _current_meter(conn, project_id, meter)
    rows = conn.execute(text(f"SELECT {_METER_COLUMNS} FROM meters WHERE id = :id ORDER BY version"),
                        {"id": current.id}).mappings().all()
    return [MeterRow.of(r) for r in rows]


def meter_histories(conn: Connection, *, project_id: str) -> dict[str, list[MeterRow]]:
    """Every version of every meter of the project in one read: meter id -> versions, oldest first."""
    rows = conn.execute(text(f"SELECT {_METER_COLUMNS} FROM meters WHERE project_id = :p ORDER BY id, version"),
                        {"p": project_id}).mappings().all()
    out: dict[str, list[MeterRow]] = {}
    for row in rows:
        out.setdefault(row["id"], []).append(MeterRow.of(row))
    return out


def update_meter(conn: Connection, *, project_id: str, meter: str, **changes: Any) -> MeterRow:
    """A new version with ``changes`` applied (name, description, event_type, aggregation, value_property,
    filters, group_by). The slug and the id stay: counters and prices keep referring to the meter."""
    allowed = {"name", "description", "event_type", "aggregation", "value_property", "filters", "group_by"}
    unknown = set(changes) - allowed
    if unknown:
        raise CatalogInvalid(f"cannot change {', '.join(sorted(unknown))} of a meter")
    current = _current_meter(conn, project_id, meter, lock=True)
    if current.archived_at is not None:
        raise CatalogConflict(f"meter {current.slug!r} is archived")
    merged = {name: getattr(current, name) for name in allowed} | {k: v for k, v in changes.items()}
    merged["aggregation"] = str(merged["aggregation"]).upper()
    merged["filters"], merged["group_by"] = list(merged["filters"] or []), list(merged["group_by"] or [])
    _check_meter(slug=current.slug, event_type=merged["event_type"], aggregation=merged["aggregation"],
                 value_property=merged["value_property"], filters=merged["filters"], group_by=merged["group_by"])
    conn.execute(text("UPDATE meters SET superseded_at = now() WHERE id = :id AND version = :v"),
                 {"id": current.id, "v": current.version})
    # History is never re-priced (DESIGN §2 invariant 9): a change to how units are counted starts new
    # counters (a new counting version, part of every counter key); a cosmetic change keeps counting on.
    counts_differently = any(merged[name] != getattr(current, name) for name in COUNTING_FIELDS)
    counting_version = current.version + 1 if counts_differently else current.counting_version
    return _insert_meter(conn, {**merged, "id": current.id, "version": current.version + 1,
                                "counting_version": counting_version,
                                "project_id": project_id, "slug": current.slug,
                                "filters": orjson.dumps(merged["filters"]).decode(),
                                "group_by": orjson.dumps(merged["group_by"]).decode()})


def archive_meter(conn: Connection, *, project_id: str, meter: str) -> MeterRow:
    """Stops metering its events (they go to the DLQ as unknown_meter unless another meter takes them)."""
    current = _current_meter(conn, project_id, meter, lock=True)
    row = conn.execute(text(f"""
        UPDATE meters SET archived_at = coalesce(archived_at, now()) WHERE id = :id AND version = :v
        RETURNING {_METER_COLUMNS}
    """), {"id": current.id, "v": current.version}).mappings().one()
    return MeterRow.of(row)


# -- prices ------------------------------------------------------------------------------------------------

_VERSION_COLUMNS = "id, price_id, version, model, period, effective_from, created_at"


def _versions(conn: Connection, price_ids: list[str]) -> dict[str, list[PriceVersionRow]]:
    out: dict[str, list[PriceVersionRow]] = {p: [] for p in price_ids}
    if price_ids:
        rows = conn.execute(text(f"""
            SELECT {_VERSION_COLUMNS} FROM price_versions WHERE price_id = ANY(CAST(:ids AS text[]))
            ORDER BY price_id, version
        """), {"ids": price_ids}).mappings().all()
        for r in rows:
            out[r["price_id"]].append(PriceVersionRow.of(r))
    return out


def _price_rows(conn: Connection, rows: list[Any]) -> list[PriceRow]:
    versions = _versions(conn, [r["id"] for r in rows])
    return [PriceRow(r["id"], r["project_id"], r["meter_id"], r["created_at"], r["archived_at"],
                     tuple(versions[r["id"]])) for r in rows]


def create_price(conn: Connection, *, project_id: str, meter: str, model: PriceModel | Mapping[str, Any],
                 period: str = "month", effective_from: datetime | None = None) -> PriceRow:
    """A price for a meter with its first version (one active price per meter)."""
    price_model = _price_model(model)
    if period not in PERIODS:
        raise CatalogInvalid(f"period must be one of {', '.join(PERIODS)}")
    current = _current_meter(conn, project_id, meter)
    if current.archived_at is not None:
        raise CatalogConflict(f"meter {current.slug!r} is archived")
    price_id = _new_id("prc")
    try:
        with conn.begin_nested():
            conn.execute(text("INSERT INTO prices (id, project_id, meter_id) VALUES (:id, :p, :m)"),
                         {"id": price_id, "p": project_id, "m": current.id})
    except IntegrityError as exc:
        raise CatalogConflict(f"meter {current.slug!r} already has an active price; add a version to it") from exc
    _insert_version(conn, price_id=price_id, version=1, model=price_model, period=period,
                    effective_from=effective_from)
    return get_price(conn, project_id=project_id, price_id=price_id)


def _insert_version(conn: Connection, *, price_id: str, version: int, model: PriceModel, period: str,
                    effective_from: datetime | None) -> None:
    conn.execute(text("""
        INSERT INTO price_versions (id, price_id, version, model, period, effective_from)
        VALUES (:id, :price_id, :version, CAST(:model AS jsonb), :period, coalesce(:effective_from, now()))
    """), {"id": _new_id("pv"), "price_id": price_id, "version": version, "model": model.model_dump_json(),
           "period": period, "effective_from": effective_from})


def add_price_version(conn: Connection, *, project_id: str, price_id: str, model: PriceModel | Mapping[str, Any],
                      period: str | None = None, effective_from: datetime | None = None) -> PriceRow:
    """A new immutable version taking effect at ``effective_from`` (default: now), after the latest one."""
    price_model = _price_model(model)
    price = conn.execute(text("SELECT * FROM prices WHERE id = :id AND project_id = :p FOR UPDATE"),
                         {"id": price_id, "p": project_id}).mappings().one_or_none()
    if price is None:
        raise PriceNotFound(f"no price {price_id!r} in project {project_id}")
    if price["archived_at"] is not None:
        raise CatalogConflict(f"price {price_id} is archived")
    last = conn.execute(text("""
        SELECT version, period, effective_from, now() AS now FROM price_versions WHERE price_id = :id
        ORDER BY version DESC LIMIT 1
    """), {"id": price_id}).mappings().one()
    starts = effective_from or last["now"]
    if starts <= last["effective_from"]:
        raise CatalogInvalid(f"effective_from must be after the latest version's ({last['effective_from']})")
    new_period = period or last["period"]
    if new_period not in PERIODS:
        raise CatalogInvalid(f"period must be one of {', '.join(PERIODS)}")
    _insert_version(conn, price_id=price_id, version=int(last["version"]) + 1, model=price_model,
                    period=new_period, effective_from=starts)
    return get_price(conn, project_id=project_id, price_id=price_id)


def get_price(conn: Connection, *, project_id: str, price_id: str) -> PriceRow:
    rows = conn.execute(text("SELECT * FROM prices WHERE id = :id AND project_id = :p"),
                        {"id": price_id, "p": project_id}).mappings().all()
    if not rows:
        raise PriceNotFound(f"no price {price_id!r} in project {project_id}")
    return _price_rows(conn, list(rows))[0]


def list_prices(conn: Connection, *, project_id: str, meter: str | None = None,
                include_archived: bool = False) -> list[PriceRow]:
    meter_id = _current_meter(conn, project_id, meter).id if meter else None
    rows = conn.execute(text("""
        SELECT * FROM prices WHERE project_id = :p AND (CAST(:m AS text) IS NULL OR meter_id = :m)
          AND (:all OR archived_at IS NULL) ORDER BY created_at, id
    """), {"p": project_id, "m": meter_id, "all": include_archived}).mappings().all()
    return _price_rows(conn, list(rows))


def archive_price(conn: Connection, *, project_id: str, price_id: str) -> PriceRow:
    """The meter's events are no longer charged (counted as unpriced) until a new price is created."""
    updated = conn.execute(text("""
        UPDATE prices SET archived_at = coalesce(archived_at, now()) WHERE id = :id AND project_id = :p RETURNING id
    """), {"id": price_id, "p": project_id}).first()
    if updated is None:
        raise PriceNotFound(f"no price {price_id!r} in project {project_id}")
    return get_price(conn, project_id=project_id, price_id=price_id)


# -- subject keys and project settings ---------------------------------------------------------------------

def set_subject_key(conn: Connection, *, project_id: str, subject: str, wallet_id: str | None = None) -> SubjectKeyRow:
    """Map ``subject`` to ``wallet_id`` (default: the subject's auto-provisioned wallet id). Idempotent for the
    same wallet; a subject already mapped to ANOTHER wallet is a conflict (delete the key first: moving a
    subject between wallets is a deliberate act, it changes who pays).

    The tenant boundary (DESIGN §2 invariant 7): the wallet must be this project's — see ``_check_wallet``."""
    if not subject or len(subject) > 256:
        raise CatalogInvalid("subject must be 1..256 characters")
    wallet = wallet_id or provisioned_wallet(conn, project_id=project_id, subject=subject)
    _check_wallet(conn, project_id=project_id, subject=subject, wallet_id=wallet)
    row = conn.execute(text("""
        INSERT INTO subject_keys (project_id, subject, wallet_id) VALUES (:p, :s, :w)
        ON CONFLICT (project_id, subject) DO UPDATE SET wallet_id = subject_keys.wallet_id
        RETURNING project_id, subject, wallet_id, created_at
    """), {"p": project_id, "s": subject, "w": wallet}).mappings().one()
    if row["wallet_id"] != wallet:
        raise CatalogConflict(f"subject {subject!r} is already mapped to wallet {row['wallet_id']}")
    return SubjectKeyRow.of(row)


def _check_wallet(conn: Connection, *, project_id: str, subject: str, wallet_id: str) -> None:
    """A subject key may point only at a wallet of its own project, else another tenant's usage would be posted
    on it (issue 13: B mapped a subject to A's wallet and charged A at B's prices).

    - an existing wallet must belong to ``project_id``;
    - a wallet that does not exist yet is created by the ledger in THIS project on the first checkpoint (or by
      the API's wallet creation), so a free name is fine — except a UUID other than the subject's own
      auto-provisioned id: auto-provisioned ids are ``uuid5(project, subject)``, guessable, and naming one of
      another project's before it exists would squat that project's future wallet.
    Both refusals are the same 404 "no wallet in this project": whether the id exists elsewhere is not leaked."""
    existing = ledger_queries.get_wallet(conn, wallet_id)
    if existing is not None:
        if existing.project_id == project_id:
            return
    elif wallet_id == provisioned_wallet(conn, project_id=project_id, subject=subject) or not _is_uuid(wallet_id):
        return
    raise WalletNotFound(f"no wallet {wallet_id!r} in project {project_id}")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def delete_subject_key(conn: Connection, *, project_id: str, subject: str) -> SubjectKeyRow:
    row = conn.execute(text("""
        DELETE FROM subject_keys WHERE project_id = :p AND subject = :s
        RETURNING project_id, subject, wallet_id, created_at
    """), {"p": project_id, "s": subject}).mappings().one_or_none()
    if row is None:
        raise SubjectKeyNotFound(f"no subject key {subject!r} in project {project_id}")
    return SubjectKeyRow.of(row)


def list_subject_keys(conn: Connection, *, project_id: str, wallet_id: str | None = None,
                      after: str | None = None, limit: int = 100) -> list[SubjectKeyRow]:
    """Ordered by subject; page with ``after`` = the last subject of the previous page."""
    rows = conn.execute(text("""
        SELECT project_id, subject, wallet_id, created_at FROM subject_keys
        WHERE project_id = :p AND (CAST(:w AS text) IS NULL OR wallet_id = :w)
          AND (CAST(:after AS text) IS NULL OR subject > :after)
        ORDER BY subject LIMIT :limit
    """), {"p": project_id, "w": wallet_id, "after": after, "limit": max(1, min(limit, 1000))}).mappings().all()
    return [SubjectKeyRow.of(r) for r in rows]


def get_project_settings(conn: Connection, *, project_id: str, default: ProjectPolicy) -> ProjectSettingsRow:
    row = conn.execute(text("SELECT * FROM project_settings WHERE project_id = :p"),
                       {"p": project_id}).mappings().one_or_none()
    if row is None:
        return ProjectSettingsRow(project_id, default.unknown_subjects, default.allowed_lateness_s)
    return ProjectSettingsRow(project_id, row["unknown_subjects"], int(row["allowed_lateness_s"]))


def set_project_settings(conn: Connection, *, project_id: str, unknown_subjects: str | None = None,
                         allowed_lateness_s: int | None = None) -> ProjectSettingsRow:
    if unknown_subjects is not None and unknown_subjects not in UNKNOWN_SUBJECTS:
        raise CatalogInvalid(f"unknown_subjects must be one of {', '.join(UNKNOWN_SUBJECTS)}")
    if allowed_lateness_s is not None and allowed_lateness_s < 0:
        raise CatalogInvalid("allowed_lateness_s must be >= 0")
    row = conn.execute(text("""
        INSERT INTO project_settings (project_id, unknown_subjects, allowed_lateness_s)
        VALUES (:p, coalesce(:u, 'auto_provision'), coalesce(:l, 3600))
        ON CONFLICT (project_id) DO UPDATE SET
            unknown_subjects = coalesce(:u, project_settings.unknown_subjects),
            allowed_lateness_s = coalesce(:l, project_settings.allowed_lateness_s), updated_at = now()
        RETURNING project_id, unknown_subjects, allowed_lateness_s
    """), {"p": project_id, "u": unknown_subjects, "l": allowed_lateness_s}).mappings().one()
    return ProjectSettingsRow(row["project_id"], row["unknown_subjects"], int(row["allowed_lateness_s"]))


# -- what the worker reads ---------------------------------------------------------------------------------

def catalog_revision(conn: Connection) -> int:
    """Bumped by a trigger on every catalog write: reload only when it moved."""
    return int(conn.execute(text("SELECT revision FROM catalog_revision WHERE id = 1")).scalar_one())


def load_catalog(conn: Connection, *, default_policy: ProjectPolicy) -> CatalogSnapshot:
    """Current meters, active prices with all their versions, subject keys and project policies."""
    meters = [
        Meter(id=r.id, project_id=r.project_id, slug=r.slug, event_type=r.event_type, aggregation=r.aggregation,
              value_property=r.value_property, filters=tuple(Filter.from_json(f) for f in r.filters),
              group_by=tuple(r.group_by), version=r.version, counting_version=r.counting_version,
              value_steps=parse_path(r.value_property) if r.value_property and r.aggregation != "COUNT" else ())
        for r in conn.execute(text("""
            SELECT id, version, project_id, slug, event_type, aggregation, value_property, filters, group_by,
                   counting_version
            FROM meters WHERE superseded_at IS NULL AND archived_at IS NULL"""))
    ]
    models: dict[str, tuple[PriceModel, dict[str, Any]]] = {}
    versions = []
    for r in conn.execute(text("""
            SELECT v.id, v.price_id, p.meter_id, p.project_id, v.version, v.model, v.period, v.effective_from
            FROM price_versions v JOIN prices p ON p.id = v.price_id WHERE p.archived_at IS NULL""")):
        model = PriceModel.model_validate(r.model)
        # defaults left out: the checkpoint embeds this for every counter (the ledger re-reads the same model)
        models[r.id] = (model, model.model_dump(mode="json", exclude_defaults=True))
        versions.append(PriceVersion(id=r.id, price_id=r.price_id, meter_id=r.meter_id, project_id=r.project_id,
                                     version=r.version, model=model, period=r.period,
                                     effective_from=r.effective_from.astimezone(UTC),
                                     model_json=models[r.id][1]))
    subjects = {(r.project_id, r.subject): r.wallet_id
                for r in conn.execute(text("SELECT project_id, subject, wallet_id FROM subject_keys"))}
    policies = {r.project_id: ProjectPolicy(r.unknown_subjects, int(r.allowed_lateness_s))
                for r in conn.execute(text("SELECT project_id, unknown_subjects, allowed_lateness_s "
                                           "FROM project_settings"))}
    # one id per erased account (partial index wallets_erased): ~100 bytes each in memory
    retired = frozenset(r.id for r in conn.execute(text("SELECT id FROM wallets WHERE erased_at IS NOT NULL")))
    loaded_at = conn.execute(text("SELECT now()")).scalar_one()
    return CatalogSnapshot.build(meters=meters, price_versions=versions, subject_keys=subjects, policies=policies,
                                 default_policy=default_policy, loaded_at=loaded_at, retired_wallets=retired)


def provisioned_wallet(conn: Connection, *, project_id: str, subject: str) -> str:
    """``provisioned_wallet_id`` against the database (the API's view of what a worker computes from its
    snapshot): the subject's first auto-provisioning generation whose wallet no erasure retired."""
    class _Retired:
        def __contains__(self, wallet_id: object) -> bool:
            return conn.execute(text("SELECT 1 FROM wallets WHERE id = :w AND erased_at IS NOT NULL"),
                                {"w": wallet_id}).first() is not None

    return provisioned_wallet_id(project_id, subject, _Retired())


def bump_revision(conn: Connection) -> None:
    """Tell the workers to reload their snapshot (e.g. a wallet was retired: its subject provisions anew)."""
    conn.execute(text("UPDATE catalog_revision SET revision = revision + 1, changed_at = now() WHERE id = 1"))
