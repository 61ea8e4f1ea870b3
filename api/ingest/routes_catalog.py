"""The streams catalog over HTTP: meters (versioned), prices (immutable versions), subject keys and the
project's unknown-subject policy. Thin: every rule lives in ``streams.catalog``; errors carry its codes
(catalog.invalid → 422, catalog.meter_not_found / price_not_found / subject_key_not_found → 404,
catalog.conflict → 409). Reads need "read", changes "admin";
every change is audited. A running streams worker picks changes up within STREAMS_CATALOG_REFRESH_MS."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from api.deps import ConnectionDep
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from ledger import pricing
from ledger.contracts import PriceModel
from streams import catalog
from streams.catalog_model import ProjectPolicy
from streams.errors import CatalogInvalid

router = APIRouter(prefix="/api/v1/projects/{project_id}", tags=["catalog"])
Read = Annotated[ProjectAccess, require_project("read")]
Admin = Annotated[ProjectAccess, require_project("admin")]
METER = Path(min_length=1, max_length=100, description="meter id (mtr_...) or slug")
Aggregation = Literal["SUM", "COUNT", "MAX", "UNIQUE_COUNT", "LATEST", "sum", "count", "max", "unique_count",
                      "latest"]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class MeterIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "slug": "tokens", "event_type": "llm.tokens", "aggregation": "SUM", "value_property": "$.tokens",
        "filters": [{"property": "$.model", "in": ["gpt-4o", "gpt-4.1"]}], "group_by": ["$.model"]}]})
    slug: str = Field(min_length=1, max_length=64)
    event_type: str = Field(min_length=1, max_length=256)
    aggregation: Aggregation = "SUM"
    value_property: str | None = Field(default=None, max_length=256, description="JSON path into data")
    filters: list[dict[str, Any]] = Field(default_factory=list, max_length=20)
    group_by: list[str] = Field(default_factory=list, max_length=20)
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2000)


class MeterPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: str | None = Field(default=None, min_length=1, max_length=256)
    aggregation: Aggregation | None = None
    value_property: str | None = Field(default=None, max_length=256)
    filters: list[dict[str, Any]] | None = Field(default=None, max_length=20)
    group_by: list[str] | None = Field(default=None, max_length=20)
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2000)


class MeterOut(BaseModel):
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
    counting_version: int = Field(description="the version at which the current definition of units started: "
                                  "changing event_type, aggregation, value_property or filters starts new "
                                  "counters at this version; usage charged before stays charged")

    @classmethod
    def of(cls, row: catalog.MeterRow) -> MeterOut:
        return cls(**row.to_json())


class PriceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "meter": "tokens", "model": {"model": "per_unit", "unit_price_minor": "0.4"}, "period": "month"}]})
    meter: str = Field(min_length=1, max_length=100, description="meter id or slug")
    model: dict[str, Any] = Field(description="PriceModel: per_unit / package / graduated / volume; "
                                              "prices are decimal strings, never floats")
    period: Literal["month", "day"] = "month"
    effective_from: AwareDatetime | None = None


class PriceVersionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: dict[str, Any]
    period: Literal["month", "day"] | None = None
    effective_from: AwareDatetime | None = Field(default=None, description=(
        "default now; after the latest version's. May be in the past (back-dated): usage already metered stays "
        "charged as it was; see the route's description"))


class PriceVersionOut(BaseModel):
    id: str
    version: int
    model: dict[str, Any]
    period: str
    effective_from: datetime
    created_at: datetime


class PriceOut(BaseModel):
    id: str
    project_id: str
    meter_id: str
    created_at: datetime
    archived_at: datetime | None
    versions: list[PriceVersionOut]

    @classmethod
    def of(cls, row: catalog.PriceRow) -> PriceOut:
        return cls(id=row.id, project_id=row.project_id, meter_id=row.meter_id, created_at=row.created_at,
                   archived_at=row.archived_at,
                   versions=[PriceVersionOut(id=v.id, version=v.version, model=v.model, period=v.period,
                                             effective_from=v.effective_from, created_at=v.created_at)
                             for v in row.versions])


class PricePreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": {"model": "graduated", "tiers": [{"up_to": "1000", "unit_price_minor": "0"},
                                                   {"up_to": None, "unit_price_minor": "0.5"}]}, "units": "2500"},
        {"price_id": "prc_...", "units": "1000000"}]})
    model: dict[str, Any] | None = Field(default=None, description="a price model to try (as in POST /prices)")
    price_id: str | None = Field(default=None, max_length=100,
                                 description="or an existing price: its version effective now")
    units: Decimal = Field(ge=-(10**30), le=10**30, description="a period's total units (decimal string)")


class PricePreviewOut(BaseModel):
    model: dict[str, Any]
    units: str
    amount_minor: int = Field(description="what the ledger charges for these units in one period (floored)")
    exact_minor: str = Field(description="the unrounded price (fractions carry to later units in the period)")


class SubjectKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wallet_id: str | None = Field(default=None, max_length=200,
                                  description="default: the subject's own auto-provisioned wallet")


class SubjectKeyOut(BaseModel):
    project_id: str
    subject: str
    wallet_id: str
    created_at: datetime


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unknown_subjects: Literal["auto_provision", "dead_letter"] | None = None
    allowed_lateness_s: int | None = Field(default=None, ge=0, le=366 * 86_400)


class PolicyOut(BaseModel):
    project_id: str
    unknown_subjects: str
    allowed_lateness_s: int


# -- meters ------------------------------------------------------------------------------------------------

@router.get("/meters", response_model=list[MeterOut], summary="The project's current meters")
def list_meters(access: Read, conn: ConnectionDep,
                include_archived: Annotated[bool, Query()] = False) -> list[MeterOut]:
    return [MeterOut.of(m) for m in catalog.list_meters(conn, project_id=access.project_id,
                                                       include_archived=include_archived)]


@router.post("/meters", status_code=201, response_model=MeterOut, summary="Create a meter (admin)")
def create_meter(body: MeterIn, access: Admin, conn: ConnectionDep) -> MeterOut:
    meter = catalog.create_meter(conn, project_id=access.project_id, **body.model_dump())
    audit(conn, access, action="meter.create", target_kind="meter", target_id=meter.id,
          after=_plain(meter.to_json()))
    return MeterOut.of(meter)


@router.get("/meters/{meter}", response_model=MeterOut, summary="A meter's current version")
def get_meter(meter: Annotated[str, METER], access: Read, conn: ConnectionDep) -> MeterOut:
    return MeterOut.of(catalog.get_meter(conn, project_id=access.project_id, meter=meter))


@router.get("/meters/{meter}/versions", response_model=list[MeterOut], summary="Every version of a meter")
def meter_versions(meter: Annotated[str, METER], access: Read, conn: ConnectionDep) -> list[MeterOut]:
    return [MeterOut.of(m) for m in catalog.meter_history(conn, project_id=access.project_id, meter=meter)]


@router.patch("/meters/{meter}", response_model=MeterOut, summary="Change a meter: a new version (admin)",
              description="Every change is a new version. A change to how units are counted (event_type, "
                          "aggregation, value_property, filters) also starts a new counting version: its counters "
                          "start at the change and usage charged under the previous definition stays charged — "
                          "history is never re-priced. Name, description and group_by changes keep counting on.")
def update_meter(meter: Annotated[str, METER], body: MeterPatch, access: Admin, conn: ConnectionDep) -> MeterOut:
    before = catalog.get_meter(conn, project_id=access.project_id, meter=meter)
    after = catalog.update_meter(conn, project_id=access.project_id, meter=meter,
                                 **body.model_dump(exclude_unset=True))
    audit(conn, access, action="meter.update", target_kind="meter", target_id=after.id,
          before=_plain(before.to_json()), after=_plain(after.to_json()))
    return MeterOut.of(after)


@router.delete("/meters/{meter}", response_model=MeterOut, summary="Archive a meter (admin); history stays")
def archive_meter(meter: Annotated[str, METER], access: Admin, conn: ConnectionDep) -> MeterOut:
    archived = catalog.archive_meter(conn, project_id=access.project_id, meter=meter)
    audit(conn, access, action="meter.archive", target_kind="meter", target_id=archived.id,
          after=_plain(archived.to_json()))
    return MeterOut.of(archived)


# -- prices ------------------------------------------------------------------------------------------------

#: The pricing rule (DESIGN §2 invariant 9), shown on the price routes of the OpenAPI document.
PRICE_VERSIONS_RULE = (
    "A price version is immutable and applies to the events whose time is at or after its `effective_from` "
    "(events before the first version use the first). **A new version continues the period**: within a wallet's "
    "period of the meter, the versions are one run of units in the order they took effect — each version prices "
    "its own units at the position the earlier versions' units left, `price_new(units_before + units_new) − "
    "price_new(units_before)`. The free allowance and the tier position carry over: with 1,000 units free, 900 "
    "units before the change and 900 after charge 800 units at the new version's price. A late event of an "
    "earlier version's time still counts in that version and moves the later versions' starting point (the "
    "result depends only on the period's units, not on their arrival order).\n\n"
    "**Back-dated versions** (`effective_from` in the past, still after the latest version's): usage already "
    "metered stays charged under the version it was metered with — history is never re-priced. Events metered "
    "after the version was added are priced by the version in effect at their time, continuing from all "
    "earlier versions' units of the period. A version that changes the period (`month` ↔ `day`) starts its own "
    "periods: nothing carries over between periods. A change to how the meter counts (PATCH of its event_type, "
    "aggregation, value_property or filters) starts new counters; its units never continue the old ones.")

@router.get("/prices", response_model=list[PriceOut], summary="Prices with all their versions")
def list_prices(access: Read, conn: ConnectionDep, meter: Annotated[str | None, Query(max_length=100)] = None,
                include_archived: Annotated[bool, Query()] = False) -> list[PriceOut]:
    return [PriceOut.of(p) for p in catalog.list_prices(conn, project_id=access.project_id, meter=meter,
                                                       include_archived=include_archived)]


@router.post("/prices", status_code=201, response_model=PriceOut, summary="Price a meter (admin)",
             description=PRICE_VERSIONS_RULE)
def create_price(body: PriceIn, access: Admin, conn: ConnectionDep) -> PriceOut:
    price = catalog.create_price(conn, project_id=access.project_id, meter=body.meter, model=body.model,
                                 period=body.period, effective_from=body.effective_from)
    audit(conn, access, action="price.create", target_kind="price", target_id=price.id,
          after=_plain(price.to_json()))
    return PriceOut.of(price)


@router.post("/prices/preview", response_model=PricePreviewOut,
             summary="What N units cost in one period under a price model or an existing price (nothing stored)")
def preview_price(body: PricePreviewIn, access: Read, conn: ConnectionDep) -> PricePreviewOut:
    if (body.model is None) == (body.price_id is None):
        raise CatalogInvalid("give exactly one of model or price_id")
    raw = body.model
    if body.price_id is not None:
        price = catalog.get_price(conn, project_id=access.project_id, price_id=body.price_id)
        now = datetime.now(UTC)
        current = [v for v in price.versions if v.effective_from <= now] or price.versions[:1]
        raw = current[-1].model
    try:
        model = PriceModel.model_validate(raw)
    except ValidationError as exc:
        raise CatalogInvalid(f"invalid price model: {exc.errors()[0]['msg']}") from exc
    return PricePreviewOut(model=_plain(model.model_dump(mode="json", exclude_none=True)),
                           units=format(body.units, "f"), amount_minor=pricing.price_minor(model, body.units),
                           exact_minor=format(pricing.price_exact(model, body.units), "f"))


@router.get("/prices/{price_id}", response_model=PriceOut, summary="A price with its versions")
def get_price(price_id: Annotated[str, Path(max_length=100)], access: Read, conn: ConnectionDep) -> PriceOut:
    return PriceOut.of(catalog.get_price(conn, project_id=access.project_id, price_id=price_id))


@router.post("/prices/{price_id}/versions", status_code=201, response_model=PriceOut,
             summary="Add an immutable price version effective from a later time (admin)",
             description=PRICE_VERSIONS_RULE)
def add_price_version(price_id: Annotated[str, Path(max_length=100)], body: PriceVersionIn, access: Admin,
                      conn: ConnectionDep) -> PriceOut:
    price = catalog.add_price_version(conn, project_id=access.project_id, price_id=price_id, model=body.model,
                                      period=body.period, effective_from=body.effective_from)
    audit(conn, access, action="price.version", target_kind="price", target_id=price.id,
          after=_plain(price.versions[-1].to_json()))
    return PriceOut.of(price)


@router.delete("/prices/{price_id}", response_model=PriceOut, summary="Archive a price (admin)")
def archive_price(price_id: Annotated[str, Path(max_length=100)], access: Admin, conn: ConnectionDep) -> PriceOut:
    price = catalog.archive_price(conn, project_id=access.project_id, price_id=price_id)
    audit(conn, access, action="price.archive", target_kind="price", target_id=price.id)
    return PriceOut.of(price)


# -- subject keys and policy -------------------------------------------------------------------------------

@router.get("/subject-keys", response_model=list[SubjectKeyOut], summary="Subject keys, ordered by subject")
def list_subject_keys(access: Read, conn: ConnectionDep,
                      wallet_id: Annotated[str | None, Query(max_length=200)] = None,
                      after: Annotated[str | None, Query(max_length=256, description="last subject seen")] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[SubjectKeyOut]:
    rows = catalog.list_subject_keys(conn, project_id=access.project_id, wallet_id=wallet_id, after=after,
                                     limit=limit)
    return [SubjectKeyOut(**r.to_json()) for r in rows]


@router.put("/subject-keys/{subject}", response_model=SubjectKeyOut,
            summary="Map a subject to a wallet (admin); idempotent, another wallet is 409")
def set_subject_key(subject: Annotated[str, Path(min_length=1, max_length=256)], body: SubjectKeyIn,
                    access: Admin, conn: ConnectionDep) -> SubjectKeyOut:
    row = catalog.set_subject_key(conn, project_id=access.project_id, subject=subject, wallet_id=body.wallet_id)
    audit(conn, access, action="subject_key.set", target_kind="subject_key", target_id=subject,
          after={"wallet_id": row.wallet_id})
    return SubjectKeyOut(**row.to_json())


@router.delete("/subject-keys/{subject}", response_model=SubjectKeyOut, summary="Remove a subject key (admin)")
def delete_subject_key(subject: Annotated[str, Path(min_length=1, max_length=256)], access: Admin,
                       conn: ConnectionDep) -> SubjectKeyOut:
    row = catalog.delete_subject_key(conn, project_id=access.project_id, subject=subject)
    audit(conn, access, action="subject_key.delete", target_kind="subject_key", target_id=subject,
          before={"wallet_id": row.wallet_id})
    return SubjectKeyOut(**row.to_json())


@router.get("/metering-policy", response_model=PolicyOut, summary="Unknown-subject policy and allowed lateness")
def get_policy(access: Read, conn: ConnectionDep) -> PolicyOut:
    from streams.settings import get_settings

    settings = get_settings()
    default = ProjectPolicy(settings.unknown_subjects, settings.allowed_lateness_s)  # type: ignore[arg-type]
    return PolicyOut(**catalog.get_project_settings(conn, project_id=access.project_id, default=default).to_json())


@router.put("/metering-policy", response_model=PolicyOut, summary="Change the metering policy (admin)")
def put_policy(body: PolicyIn, access: Admin, conn: ConnectionDep) -> PolicyOut:
    row = catalog.set_project_settings(conn, project_id=access.project_id, unknown_subjects=body.unknown_subjects,
                                       allowed_lateness_s=body.allowed_lateness_s)
    audit(conn, access, action="metering_policy.set", target_kind="project", target_id=access.project_id,
          after=row.to_json())
    return PolicyOut(**row.to_json())
