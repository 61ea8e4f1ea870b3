"""Finance exports as downloads (admin): transactions, usage, balances of a time range, CSV or Parquet
(ledger/exports.py). Streamed from one REPEATABLE READ snapshot on a connection of the download's own, so a
large range never sits in memory; transaction rows carry their chain hash."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse

from api.errors import ApiError
from api.tenancy.auth import ProjectAccess, require_project
from ledger.exports import EXPORTS, encode, stream_rows

router = APIRouter(prefix="/api/v1/projects/{project_id}/exports", tags=["exports"])

_MEDIA = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get("/{what}", summary="Download a finance export (CSV or Parquet)",
            responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
def download_export(
    request: Request, access: Annotated[ProjectAccess, require_project("admin")],
    what: Annotated[Literal["transactions", "usage", "balances"], Path()],
    since: Annotated[datetime, Query(alias="from", description="start, inclusive (ISO 8601; UTC if no offset)")],
    until: Annotated[datetime, Query(alias="to", description="end, exclusive")],
    fmt: Annotated[Literal["csv", "parquet"], Query(alias="format")] = "csv",
) -> StreamingResponse:
    start, end = _utc(since), _utc(until)
    if start >= end:
        raise ApiError("from must be before to", status=422)
    spec = EXPORTS[what]
    engine = request.app.state.engine

    def body() -> Iterator[bytes]:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield from encode(spec, stream_rows(conn, spec, since=start, until=end,
                                                    project_id=access.project_id), fmt)

    name = f"{what}-{start:%Y%m%dT%H%M%S}-{end:%Y%m%dT%H%M%S}.{fmt}"
    return StreamingResponse(body(), media_type=_MEDIA[fmt],
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})
