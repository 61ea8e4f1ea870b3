"""Typed exceptions for API problems (RFC 9457 problem+json): one class per thing a caller handles differently.

Every one carries ``status``, ``code`` (the API's stable code), ``detail`` and the whole ``problem`` body.
The class is chosen by ``code`` first (``ledger.insufficient_credits`` → ``InsufficientCredits``), then by the
HTTP status (404 → ``NotFound``), so a new code still lands in the right family."""

from __future__ import annotations

from typing import Any

import httpx

from meterline.client.usage import MeterlineError

__all__ = ["ApiProblem", "Conflict", "Forbidden", "HoldNotActive", "IdempotencyConflict", "InsufficientCredits",
           "NotFound", "RateLimited", "ServerError", "Unauthorized", "ValidationFailed", "WalletBlocked",
           "WalletClosed", "problem_from_response"]


class ApiProblem(MeterlineError):
    """The API refused the request; ``problem`` is its problem+json body."""

    def __init__(self, status: int, code: str, detail: str, problem: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem


class Unauthorized(ApiProblem):
    """401: no token, an expired or revoked one."""


class Forbidden(ApiProblem):
    """403: the role or the key's scopes do not allow it."""


class NotFound(ApiProblem):
    """404: no such wallet, transaction, hold, meter... in this project."""


class Conflict(ApiProblem):
    """409: the state does not allow it."""


class ValidationFailed(ApiProblem):
    """422: the request does not match the schema; ``missing`` lists every missing field."""

    @property
    def missing(self) -> list[str]:
        return list(self.problem.get("missing") or [])


class InsufficientCredits(ApiProblem):
    """402: not enough available credits (nothing was charged)."""


class WalletBlocked(ApiProblem):
    """The wallet is in debt: new debits and reservations are refused until it is settled."""


class WalletClosed(ApiProblem):
    """The wallet is closed (its end user asked for erasure)."""


class HoldNotActive(Conflict):
    """The reservation was committed, voided or expired."""


class IdempotencyConflict(Conflict):
    """The Idempotency-Key was used before for a different request."""


class RateLimited(ApiProblem):
    """429: slow down; ``retry_after_s`` says for how long."""

    @property
    def retry_after_s(self) -> float | None:
        value = self.problem.get("retry_after_s")
        return float(value) if isinstance(value, int | float) else None


class ServerError(ApiProblem):
    """5xx: the API could not answer (retried by the client before this is raised)."""


_BY_CODE: dict[str, type[ApiProblem]] = {
    "ledger.insufficient_credits": InsufficientCredits,
    "ledger.wallet_blocked": WalletBlocked,
    "ledger.wallet_closed": WalletClosed,
    "ledger.hold_not_active": HoldNotActive,
    "ledger.idempotency_conflict": IdempotencyConflict,
    "api.idempotency_conflict": IdempotencyConflict,
    "api.validation_failed": ValidationFailed,
}
_BY_STATUS: dict[int, type[ApiProblem]] = {401: Unauthorized, 402: InsufficientCredits, 403: Forbidden,
                                           404: NotFound, 409: Conflict, 422: ValidationFailed, 429: RateLimited}


def problem_from_response(response: httpx.Response) -> ApiProblem:
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {"detail": response.text[:500]}
    code = str(problem.get("code") or f"http.{response.status_code}")
    detail = str(problem.get("detail") or response.reason_phrase)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code) or (
        ServerError if response.status_code >= 500 else ApiProblem)
    return cls(response.status_code, code, detail, problem)
