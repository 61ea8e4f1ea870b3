"""The ONE place where errors become HTTP responses: RFC 9457 problem+json with a stable ``code``.

Only the project's OWN error classes are answered with their code and message: ``ApiError`` and the
components' hierarchies in ``COMPONENT_ERRORS`` (``STATUS_BY_CODE`` maps their codes to statuses). Anything
else — a database error, a bug, a library's exception, even one that happens to carry a ``code`` attribute
(SQLAlchemy's do, and their text holds the SQL and its bound parameters) — is an unexpected error: the HTTP
hygiene middleware (api/middleware.py) answers it with a bare 500 ``api.internal`` carrying only the request
id, logs it without its message, and keeps the connection alive."""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from analytics.errors import AnalyticsError
from ledger.errors import HTTP_STATUS as LEDGER_HTTP_STATUS
from ledger.errors import LedgerError
from ledger.kafka import MissingTopicsError
from streams.errors import StreamsError

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


#: The components' error hierarchies: the only non-api exceptions whose code and message reach a client.
COMPONENT_ERRORS: tuple[type[Exception], ...] = (LedgerError, StreamsError, AnalyticsError, MissingTopicsError)


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

    async def _component(request: Request, exc: Exception) -> JSONResponse:
        code = str(getattr(exc, "code", "api.internal"))
        return problem(STATUS_BY_CODE.get(code, 500), code, str(exc), instance=request.url.path,
                       **_component_extra(code, getattr(exc, "extra", None)))

    # Registered by class, so Starlette's ExceptionMiddleware answers them like ApiError (no traceback logged,
    # keep-alive kept). There is deliberately NO handler for ``Exception``: an unexpected error reaches the
    # hygiene middleware, which answers the bare 500 (a handler for Exception would run in Starlette's
    # ServerErrorMiddleware, which logs the exception's text and makes uvicorn drop the connection).
    for cls in COMPONENT_ERRORS:
        app.add_exception_handler(cls, _component)


def internal_error_body(path: str, request_id: str | None) -> dict[str, Any]:
    """The body of every unexpected 500: no detail beyond the request id to quote when reporting it."""
    return {"type": "https://meterline.dev/problems/api.internal", "title": "internal", "status": 500,
            "detail": "unexpected error; quote the request id when reporting it", "code": "api.internal",
            "instance": path, "request_id": request_id}
