"""What a named feature costs, per project (the seed's ProviderFeatureCost).

Admins edit costs without a deploy; ``POST .../debit`` and ``.../reservations`` accept a ``feature_key``
instead of an amount and charge ``cost_minor × quantity``. The cost is read in the same transaction as the
debit, so a debit is priced by exactly one version of the table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from api.errors import ApiError, NotFound


class UnknownFeature(ApiError):
    status = 422
    code = "api.unknown_feature"


class UnknownPlan(ApiError):
    status = 422
    code = "api.unknown_plan"


@dataclass(frozen=True, slots=True)
class FeatureCost:
    project_id: str
    feature_key: str
    cost_minor: int
    description: str | None
    requires_entitlement: str | None  # None, "*" (any active plan) or a plan offer slug (api/access/access_policy.py)
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: Any) -> FeatureCost:
        return cls(**{name: row[name] for name in cls.__slots__})

    def as_dict(self) -> dict[str, Any]:
        return {"feature_key": self.feature_key, "cost_minor": self.cost_minor, "description": self.description,
                "requires_entitlement": self.requires_entitlement}


_COLUMNS = "project_id, feature_key, cost_minor, description, requires_entitlement, created_at, updated_at"


def list_feature_costs(conn: Connection, *, project_id: str) -> list[FeatureCost]:
    rows = conn.execute(text(f"SELECT {_COLUMNS} FROM feature_costs WHERE project_id = :p ORDER BY feature_key"),
                        {"p": project_id}).mappings().all()
    return [FeatureCost.from_mapping(r) for r in rows]


def get_feature_cost(conn: Connection, *, project_id: str, feature_key: str) -> FeatureCost | None:
    row = conn.execute(text(f"SELECT {_COLUMNS} FROM feature_costs WHERE project_id = :p AND feature_key = :k"),
                       {"p": project_id, "k": feature_key}).mappings().first()
    return FeatureCost.from_mapping(row) if row else None


def put_feature_cost(conn: Connection, *, project_id: str, feature_key: str, cost_minor: int,
                     description: str | None, requires_entitlement: str | None = None
                     ) -> tuple[FeatureCost | None, FeatureCost]:
    """Create or replace; returns (before, after). ``requires_entitlement`` gates access checks: None (no gate),
    ``*`` (any active plan) or the slug of a plan of this project (else 422)."""
    if requires_entitlement not in (None, "*"):
        plan = conn.execute(text("SELECT 1 FROM payment_offers WHERE project_id = :p AND slug = :s AND kind = 'plan'"),
                            {"p": project_id, "s": requires_entitlement}).first()
        if plan is None:
            raise UnknownPlan(f"no plan {requires_entitlement!r} in this project",
                              extra={"requires_entitlement": requires_entitlement})
    before = get_feature_cost(conn, project_id=project_id, feature_key=feature_key)
    row = conn.execute(text(f"""
        INSERT INTO feature_costs (project_id, feature_key, cost_minor, description, requires_entitlement)
        VALUES (:p, :k, :c, :d, :e)
        ON CONFLICT (project_id, feature_key) DO UPDATE
            SET cost_minor = excluded.cost_minor, description = excluded.description,
                requires_entitlement = excluded.requires_entitlement, updated_at = now()
        RETURNING {_COLUMNS}"""), {"p": project_id, "k": feature_key, "c": cost_minor, "d": description,
                                   "e": requires_entitlement}).mappings().one()
    return before, FeatureCost.from_mapping(row)


def delete_feature_cost(conn: Connection, *, project_id: str, feature_key: str) -> FeatureCost:
    row = conn.execute(text(f"DELETE FROM feature_costs WHERE project_id = :p AND feature_key = :k RETURNING {_COLUMNS}"),
                       {"p": project_id, "k": feature_key}).mappings().first()
    if row is None:
        raise NotFound("no such feature cost")
    return FeatureCost.from_mapping(row)


def price_feature(conn: Connection, *, project_id: str, feature_key: str, quantity: int) -> tuple[int, FeatureCost]:
    """(amount_minor, the cost row used). Unknown features are a 422 naming the feature."""
    cost = get_feature_cost(conn, project_id=project_id, feature_key=feature_key)
    if cost is None:
        raise UnknownFeature(f"no cost is configured for feature {feature_key!r}", extra={"feature_key": feature_key})
    return cost.cost_minor * quantity, cost
