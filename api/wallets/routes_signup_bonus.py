"""The project's sign-up bonus config (GET: everyone in the project; PUT: admin, audited).

The bonus itself is granted by wallet creation (api/wallets/routes_wallets.py → api/wallets/signup_bonus.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import ConnectionDep
from api.errors import NotFound
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.wallets.signup_bonus import COUNTRY, BonusConfig, get_config, put_config

router = APIRouter(prefix="/api/v1/projects/{project_id}/signup-bonus", tags=["sign-up bonus"])

AMOUNT_MAX = 10**15
COUNTRIES_MAX = 300

EXAMPLE: dict[str, Any] = {"enabled": True, "default_amount_minor": 100, "country_amounts": {"US": 500, "GB": 500, "XX": 0},
           "expires_after_s": 30 * 24 * 3600, "ip_network_daily_limit": 5, "require_device_id": False}


class BonusConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        EXAMPLE, {"default_amount_minor": 50}, {"enabled": False, "default_amount_minor": 50}]})
    enabled: bool = Field(default=True, description="false: every sign-up is answered reason 'disabled'")
    default_amount_minor: int = Field(default=0, ge=0, le=AMOUNT_MAX,
                                      description="credits (minor units) for a country not listed or unknown")
    country_amounts: dict[str, int] = Field(
        default_factory=dict, description="ISO 3166-1 alpha-2 → credits (minor units); 0 = no bonus there")
    expires_after_s: int | None = Field(default=None, ge=3600, le=10 * 366 * 24 * 3600,
                                        description="bonus credits expire this long after the grant (None: never)")
    ip_network_daily_limit: int | None = Field(
        default=None, ge=0, le=1_000_000,
        description="at most this many bonuses per IP network (/24 IPv4, /64 IPv6) in any 24 h (None: no limit)")
    require_device_id: bool = Field(default=False, description="refuse the bonus when no signup.device_id is sent")

    @field_validator("country_amounts")
    @classmethod
    def _countries(cls, value: dict[str, int]) -> dict[str, int]:
        if len(value) > COUNTRIES_MAX:
            raise ValueError(f"at most {COUNTRIES_MAX} countries; put the common amount in default_amount_minor")
        out: dict[str, int] = {}
        for key, amount in value.items():
            code = key.strip().upper()
            if not COUNTRY.match(code):
                raise ValueError(f"{key!r} is not an ISO 3166-1 alpha-2 country code; use two letters such as "
                                 "'US' or 'GB'")
            if code in out:
                raise ValueError(f"{code} is listed twice (keys are case-insensitive); keep one")
            if isinstance(amount, bool) or not 0 <= amount <= AMOUNT_MAX:
                raise ValueError(f"the amount for {code} must be an integer from 0 (no bonus there) to {AMOUNT_MAX}")
            out[code] = amount
        return out

    def config(self) -> BonusConfig:
        return BonusConfig(enabled=self.enabled, default_amount_minor=self.default_amount_minor,
                           country_amounts=self.country_amounts, expires_after_s=self.expires_after_s,
                           ip_network_daily_limit=self.ip_network_daily_limit,
                           require_device_id=self.require_device_id)


class BonusConfigOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})
    enabled: bool
    default_amount_minor: int
    country_amounts: dict[str, int]
    expires_after_s: int | None
    ip_network_daily_limit: int | None
    require_device_id: bool

    @classmethod
    def of(cls, c: BonusConfig) -> BonusConfigOut:
        return cls(**c.as_dict())


@router.get("", response_model=BonusConfigOut, responses={404: {"description": "no bonus configured (or no such "
                                                                                  "project)"}},
            summary="The project's sign-up bonus config")
def read_config(access: Annotated[ProjectAccess, require_project("read")], conn: ConnectionDep) -> BonusConfigOut:
    config = get_config(conn, access.project_id)
    if config is None:
        raise NotFound("no sign-up bonus is configured for this project; PUT one to start granting")
    return BonusConfigOut.of(config)


@router.put("", response_model=BonusConfigOut, summary="Set the sign-up bonus config (admin): amounts by "
                                                       "country, expiry, abuse limits")
def write_config(body: BonusConfigIn, access: Annotated[ProjectAccess, require_project("admin")],
                 conn: ConnectionDep) -> BonusConfigOut:
    before, after = put_config(conn, access.project_id, body.config())
    audit(conn, access, action="signup_bonus.put", target_kind="signup_bonus", target_id=access.project_id,
          before=before.as_dict() if before else None, after=after.as_dict())
    return BonusConfigOut.of(after)
