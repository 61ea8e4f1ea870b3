"""Feature costs: a per-project price list of named features (admins edit, everyone in the project reads)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ConnectionDep
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.wallets.feature_costs import FeatureCost, delete_feature_cost, list_feature_costs, put_feature_cost

router = APIRouter(prefix="/api/v1/projects/{project_id}/feature-costs", tags=["feature costs"])
FEATURE_KEY = Path(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,99}$", examples=["image_to_image"])


class FeatureCostPut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"cost_minor": 5, "description": "Image-to-image generation"},
        {"cost_minor": 0, "description": "Export to PDF (subscribers only)", "requires_entitlement": "*"},
        {"cost_minor": 20, "description": "4k upscaling", "requires_entitlement": "pro-monthly"}]})
    cost_minor: int = Field(ge=0, le=10**15, description="credits (minor units) charged per use")
    description: str | None = Field(default=None, max_length=500)
    requires_entitlement: str | None = Field(
        default=None, pattern=r"^(\*|[a-z0-9][a-z0-9_.-]{0,63})$",
        description="access checks deny 'upgrade_required' unless the wallet has an active plan: '*' = any plan, "
                    "else the slug of the plan required; omit (null) for no gate. PUT replaces, so omitting it "
                    "removes a gate")


class FeatureCostOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "feature_key": "image_to_image", "cost_minor": 5, "description": "Image-to-image generation",
        "requires_entitlement": None, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}]})
    feature_key: str
    cost_minor: int
    description: str | None
    requires_entitlement: str | None = Field(description="null, '*' (any active plan) or a plan slug")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, c: FeatureCost) -> FeatureCostOut:
        return cls(feature_key=c.feature_key, cost_minor=c.cost_minor, description=c.description,
                   requires_entitlement=c.requires_entitlement, created_at=c.created_at, updated_at=c.updated_at)


@router.get("", response_model=list[FeatureCostOut], summary="The project's feature price list")
def feature_costs(access: Annotated[ProjectAccess, require_project("read")],
                  conn: ConnectionDep) -> list[FeatureCostOut]:
    return [FeatureCostOut.of(c) for c in list_feature_costs(conn, project_id=access.project_id)]


@router.put("/{feature_key}", response_model=FeatureCostOut, summary="Set what a feature costs (admin)",
            responses={422: {"description": "requires_entitlement names no plan of this project (api.unknown_plan)"}})
def put(feature_key: Annotated[str, FEATURE_KEY], body: FeatureCostPut,
        access: Annotated[ProjectAccess, require_project("admin")], conn: ConnectionDep) -> FeatureCostOut:
    before, after = put_feature_cost(conn, project_id=access.project_id, feature_key=feature_key,
                                     cost_minor=body.cost_minor, description=body.description,
                                     requires_entitlement=body.requires_entitlement)
    audit(conn, access, action="feature_cost.put", target_kind="feature_cost", target_id=feature_key,
          before=before.as_dict() if before else None, after=after.as_dict())
    return FeatureCostOut.of(after)


@router.delete("/{feature_key}", status_code=204, summary="Remove a feature from the price list (admin)")
def delete(feature_key: Annotated[str, FEATURE_KEY], access: Annotated[ProjectAccess, require_project("admin")],
           conn: ConnectionDep) -> Response:
    removed = delete_feature_cost(conn, project_id=access.project_id, feature_key=feature_key)
    audit(conn, access, action="feature_cost.delete", target_kind="feature_cost", target_id=feature_key,
          before=removed.as_dict())
    return Response(status_code=204)
