"""The ONE place where errors become HTTP responses: RFC 9457 problem+json with a stable ``code``.

Components raise their own errors (each with a ``code`` class attribute); ``STATUS_BY_CODE`` maps codes
to statuses. Unknown component errors become 500 with the code kept, so nothing is mapped by accident."""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger.errors import HTTP_STATUS as LEDGER_HTTP_STATUS

PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """An error raised by api code with its HTTP status and stable code."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "api.bad_request"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}
        if status is not None:
            self.status = status  # type: ignore[misc]


class NotFound(ApiError):
    status = 404
    code = "api.not_found"


class Unauthorized(ApiError):
    status = 401
    code = "api.unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "api.forbidden"


class Conflict(ApiError):
    status = 409
    code = "api.conflict"


class Unavailable(ApiError):
    status = 503
    code = "api.unavailable"


#: Status for errors raised by the components (their ``code`` attribute). Extend as components add errors.
STATUS_BY_CODE: dict[str, int] = {
    "kafka.missing_topics": 503,
    "analytics.bad_query": 400,
    "analytics.unavailable": 503,
    # ledger: its own map (ledger/errors.py), one place for both
    **LEDGER_HTTP_STATUS,
    # the catalog: meters, prices, subject keys (raised by streams/catalog.py under public codes)
    "catalog.invalid": 422,
    "catalog.not_found": 404,
    "catalog.meter_not_found": 404,
    "catalog.price_not_found": 404,
    "catalog.subject_key_not_found": 404,
    "catalog.wallet_not_found": 404,
    "catalog.conflict": 409,
}


def problem(status: int, code: str, detail: str, *, title: str | None = None, instance: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": f"https://meterline.dev/problems/{code}", "title": title or code.split(".")[-1].replace("_", " "),
            "status": status, "detail": detail, "code": code, **extra}
    if instance:
        body["instance"] = instance
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_PROBLEM_FIELDS = frozenset({"type", "title", "status", "detail", "code", "instance", "headers"})


def _component_extra(code: str, extra: object) -> dict[str, Any]:
    """A component error's details as problem members; a name the problem itself uses (e.g. a hold's
    ``status``) is prefixed with the component (``ledger_status``) instead of clobbering it."""
    if not isinstance(extra, dict):
        return {}
    component = code.split(".", 1)[0]
    return {(f"{component}_{k}" if k in _PROBLEM_FIELDS else k): v for k, v in extra.items()}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, instance=request.url.path,
                       headers=getattr(exc, "headers", None), **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        # every missing field by name (pydantic reports all of them; say so in the detail too, not only the first)
        missing = [".".join(str(part) for part in e["loc"][1:] or e["loc"]) for e in errors if e["type"] == "missing"]
        invalid = [".".join(str(part) for part in e["loc"][1:] or e["loc"]) for e in errors if e["type"] != "missing"]
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"invalid {', '.join(invalid)}"] if invalid else [])
        detail = f"the request does not match the schema: {'; '.join(parts)}" if parts else \
            "the request does not match the schema; see errors"
        return problem(422, "api.validation_failed", detail, instance=request.url.path, errors=errors,
                       missing=missing)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, f"http.{exc.status_code}", str(exc.detail), instance=request.url.path,
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _component(request: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "code", None)
        if isinstance(code, str):
            extra = getattr(exc, "extra", None)
            return problem(STATUS_BY_CODE.get(code, 500), code, str(exc), instance=request.url.path,
                           **_component_extra(code, extra))
        return problem(500, "api.internal", "unexpected error; it has been logged", instance=request.url.path)

    # Handlers for ``Exception`` run in Starlette's ServerErrorMiddleware, which logs a traceback and re-raises
    # after answering (uvicorn then drops the keep-alive connection). Expected component errors (402 for
    # insufficient credits is routine) are registered by class so they are answered like ApiError.
    from ledger.errors import LedgerError

    app.add_exception_handler(LedgerError, _component)
