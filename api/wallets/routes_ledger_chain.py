"""Chain heads for auditors (ledger/chain.py): per UTC day, each wallet's last link and a digest of them.

An auditor pins the digests (or the heads) as they are published; `meterline ledger verify` later proves the
chains still hash to them — a rewritten transaction changes every later link of its wallet."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from api.deps import ConnectionDep
from api.errors import ApiError
from api.tenancy.auth import ProjectAccess, require_project
from ledger.chain import chain_heads

router = APIRouter(prefix="/api/v1/projects/{project_id}/ledger", tags=["ledger audit"])

DAYS_MAX = 92


class ChainHeadOut(BaseModel):
    wallet_id: str
    transaction_id: int
    chain_hash: str


class DayHeadsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "day": "2026-12-03", "digest": "9f2c…", "heads": [
            {"wallet_id": "w_1", "transaction_id": 981, "chain_hash": "4be1…"}]}]})
    day: date
    digest: str
    heads: list[ChainHeadOut]


class ChainHeadsOut(BaseModel):
    algorithm: str = "sha256(previous link || payload); digest = sha256 of 'wallet:transaction:hash\\n' lines"
    days: list[DayHeadsOut]


@router.get("/chain-heads", response_model=ChainHeadsOut, summary="Each day's last hash-chain link per wallet")
def get_chain_heads(
    access: Annotated[ProjectAccess, require_project("read")], conn: ConnectionDep,
    since: Annotated[date | None, Query(alias="from", description="first UTC day (default: 7 days ago)")] = None,
    until: Annotated[date | None, Query(alias="to", description="last UTC day, inclusive (default: today)")] = None,
) -> ChainHeadsOut:
    last = until or datetime.now(UTC).date()
    first = since or last - timedelta(days=6)
    if first > last or (last - first).days >= DAYS_MAX:
        raise ApiError(f"from must be on or before to, at most {DAYS_MAX} days apart", status=422)
    days = chain_heads(conn, project_id=access.project_id, since=first, until=last + timedelta(days=1))
    return ChainHeadsOut(days=[DayHeadsOut(day=d.day, digest=d.digest, heads=[
        ChainHeadOut(wallet_id=h.wallet_id, transaction_id=h.transaction_id, chain_hash=h.chain_hash)
        for h in d.heads]) for d in days])
