"""The money API from Python: balances, debits, reservations (reserve / commit / void), refunds, grants, access
checks and transactions — sync (``MeterlineApi``) and async (``AsyncMeterlineApi``), typed results
(meterline/client/models.py), problem+json errors raised as typed exceptions (meterline/client/errors.py).

Both clients build the SAME requests (``Calls``: pure, no I/O) and differ only in how they send them.

Retries, stated: a connection error, a 5xx or a 429 is retried (``max_attempts``, exponential backoff with
jitter, ``Retry-After`` honoured) with the SAME ``Idempotency-Key``, so a retry after a lost answer never charges
twice (the API replays the first result). Every money call sends a key: yours (``idempotency_key=`` — use one
derived from your own operation, e.g. ``f"job-{job.id}"``, to make your own retries safe too) or one generated
per call. Any other 4xx is raised at once.

Authentication: a user's access token or a project API key (``mlk_...``; the debit/reserve/commit/void/refund/
check routes accept keys with the admin scope or members' tokens, grants need the admin role).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import httpx
from pydantic import BaseModel

from meterline.client.errors import problem_from_response
from meterline.client.models import (
    AccessDecision,
    Commit,
    HoldResult,
    Posting,
    TransactionPage,
    Wallet,
)

__all__ = ["AsyncMeterlineApi", "Call", "Calls", "MeterlineApi"]

M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Call:
    """One request: what to send and what model the answer is."""

    method: str
    path: str
    model: type[BaseModel]
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None


def _clean(body: dict[str, Any]) -> dict[str, Any]:
    """Drop unset optional fields; datetimes as ISO 8601 (they must carry a time zone)."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if value is None:
            continue
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError(f"{key} must carry a time zone (UTC)")
            value = value.isoformat()
        out[key] = value
    return out


def _key(given: str | None) -> str:
    return given or f"sdk-{uuid.uuid4().hex}"


class Calls:
    """Pure request builders for one project."""

    def __init__(self, project_id: str) -> None:
        self.base = f"/api/v1/projects/{project_id}"

    def _wallet(self, wallet_id: str) -> str:
        return f"{self.base}/wallets/{wallet_id}"

    def wallet(self, wallet_id: str) -> Call:
        return Call("GET", self._wallet(wallet_id), Wallet)

    def transactions(self, wallet_id: str, *, limit: int | None = None, cursor: str | None = None,
                     kinds: list[str] | None = None, source_ref: str | None = None) -> Call:
        params = _clean({"limit": limit, "cursor": cursor, "kind": kinds, "source_ref": source_ref})
        return Call("GET", f"{self._wallet(wallet_id)}/transactions", TransactionPage, params=params)

    def debit(self, wallet_id: str, *, amount_minor: int | None = None, feature_key: str | None = None,
              quantity: int | None = None, source_ref: str | None = None, metadata: dict[str, Any] | None = None,
              idempotency_key: str | None = None) -> Call:
        body = _clean({"amount_minor": amount_minor, "feature_key": feature_key, "quantity": quantity,
                       "source_ref": source_ref, "metadata": metadata})
        return Call("POST", f"{self._wallet(wallet_id)}/debit", Posting, body, idempotency_key=_key(idempotency_key))

    def reserve(self, wallet_id: str, *, amount_minor: int | None = None, feature_key: str | None = None,
                quantity: int | None = None, timeout_s: int | None = None,
                idempotency_key: str | None = None) -> Call:
        body = _clean({"amount_minor": amount_minor, "feature_key": feature_key, "quantity": quantity,
                       "timeout_s": timeout_s})
        return Call("POST", f"{self._wallet(wallet_id)}/reservations", HoldResult, body,
                    idempotency_key=_key(idempotency_key))

    def commit(self, wallet_id: str, hold_id: str, *, amount_minor: int, metadata: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> Call:
        body = _clean({"amount_minor": amount_minor, "metadata": metadata})
        return Call("POST", f"{self._wallet(wallet_id)}/reservations/{hold_id}/commit", Commit, body,
                    idempotency_key=_key(idempotency_key))

    def void(self, wallet_id: str, hold_id: str, *, idempotency_key: str | None = None) -> Call:
        return Call("POST", f"{self._wallet(wallet_id)}/reservations/{hold_id}/void", HoldResult, None,
                    idempotency_key=_key(idempotency_key))

    def refund(self, wallet_id: str, transaction_id: int, *, reason: str, amount_minor: int | None = None,
               idempotency_key: str | None = None) -> Call:
        body = _clean({"reason": reason, "amount_minor": amount_minor})
        return Call("POST", f"{self._wallet(wallet_id)}/transactions/{transaction_id}/refund", Posting, body,
                    idempotency_key=_key(idempotency_key))

    def grant(self, wallet_id: str, *, amount_minor: int, kind: str = "top_up", expires_at: datetime | None = None,
              priority: int | None = None, source_ref: str | None = None, reason: str | None = None,
              idempotency_key: str | None = None) -> Call:
        body = _clean({"amount_minor": amount_minor, "kind": kind, "expires_at": expires_at, "priority": priority,
                       "source_ref": source_ref, "reason": reason})
        return Call("POST", f"{self._wallet(wallet_id)}/grants", Posting, body,
                    idempotency_key=_key(idempotency_key))

    def check_access(self, *, feature_key: str, subject: str | None = None, wallet_id: str | None = None,
                     quantity: int | None = None, charge: bool = False, asset_id: str | None = None,
                     action: str | None = None, idempotency_key: str | None = None) -> Call:
        """A recorded decision; with ``charge=True`` an allowed check debits the cost (so it needs a key)."""
        if (subject is None) == (wallet_id is None):
            raise ValueError("give exactly one of subject or wallet_id")
        body = _clean({"feature_key": feature_key, "subject": subject, "wallet_id": wallet_id, "quantity": quantity,
                       "charge": charge or None, "asset_id": asset_id, "action": action})
        key = _key(idempotency_key) if charge or idempotency_key else None
        return Call("POST", f"{self.base}/access/check", AccessDecision, body, idempotency_key=key)


@dataclass(frozen=True)
class _Retry:
    max_attempts: int = 3
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and response.headers.get("retry-after", "").isdigit():
            return min(float(response.headers["retry-after"]), self.backoff_max_s)
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": "meterline-python-sdk"}


def _request_kwargs(call: Call) -> dict[str, Any]:
    headers = {"Idempotency-Key": call.idempotency_key} if call.idempotency_key else {}
    return {"json": call.json, "params": call.params or None, "headers": headers}


def _sync(builder: Callable[Concatenate[Calls, P], Call], model: type[M],
          doc: str) -> Callable[Concatenate[MeterlineApi, P], M]:
    """A typed sync method from a request builder: same parameters, result parsed into ``model``."""

    def method(self: MeterlineApi, /, *args: P.args, **kwargs: P.kwargs) -> M:
        return cast(M, self._send(builder(self.calls, *args, **kwargs)))

    method.__doc__ = doc
    return method


def _async(builder: Callable[Concatenate[Calls, P], Call], model: type[M],
           doc: str) -> Callable[Concatenate[AsyncMeterlineApi, P], Coroutine[Any, Any, M]]:
    async def method(self: AsyncMeterlineApi, /, *args: P.args, **kwargs: P.kwargs) -> M:
        return cast(M, await self._send(builder(self.calls, *args, **kwargs)))

    method.__doc__ = doc
    return method


_DOCS = {
    "wallet": "The wallet and its balance (available, held, floor, debt, blocked).",
    "transactions": "A page of transactions, newest first (limit; cursor = the previous page's next_cursor).",
    "debit": "Charge now: amount_minor or feature_key (x quantity); raises InsufficientCredits.",
    "reserve": "Hold credits (amount_minor or feature_key) for timeout_s; commit or void it later.",
    "commit": "Charge the actual amount_minor of a hold (the rest is released).",
    "void": "Release a hold without charging.",
    "refund": "A compensating transaction (reason required; amount_minor defaults to what is left).",
    "grant": "Credits as a bucket (amount_minor, kind, expires_at, priority...); admin.",
    "check_access": "Ask before serving a feature; a denial is an answer (allowed false, reason), not an "
                    "exception. charge=True debits the cost when allowed.",
}


class MeterlineApi:
    """Synchronous client of one project. Use as a context manager (or call ``close``)."""

    def __init__(self, base_url: str, token: str, project_id: str, *, timeout_s: float = 10.0,
                 max_attempts: int = 3, transport: httpx.BaseTransport | None = None) -> None:
        self.calls = Calls(project_id)
        self._retry = _Retry(max_attempts=max_attempts)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(token), timeout=timeout_s,
                                  transport=transport)

    def _send(self, call: Call) -> Any:
        for attempt in range(self._retry.max_attempts):
            last = attempt == self._retry.max_attempts - 1
            try:
                response = self._http.request(call.method, call.path, **_request_kwargs(call))
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(self._retry.delay(attempt, None))
                continue
            if response.status_code in _RETRY_STATUSES and not last:
                time.sleep(self._retry.delay(attempt, response))
                continue
            return _parse(call, response)
        raise AssertionError("unreachable")

    wallet = _sync(Calls.wallet, Wallet, _DOCS["wallet"])
    balance = _sync(Calls.wallet, Wallet, "Alias of wallet(): read .balance.available_minor.")
    transactions = _sync(Calls.transactions, TransactionPage, _DOCS["transactions"])
    debit = _sync(Calls.debit, Posting, _DOCS["debit"])
    reserve = _sync(Calls.reserve, HoldResult, _DOCS["reserve"])
    commit = _sync(Calls.commit, Commit, _DOCS["commit"])
    void = _sync(Calls.void, HoldResult, _DOCS["void"])
    refund = _sync(Calls.refund, Posting, _DOCS["refund"])
    grant = _sync(Calls.grant, Posting, _DOCS["grant"])
    check_access = _sync(Calls.check_access, AccessDecision, _DOCS["check_access"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MeterlineApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMeterlineApi:
    """The same client for asyncio: every method returns an awaitable. ``async with`` (or ``await aclose()``)."""

    def __init__(self, base_url: str, token: str, project_id: str, *, timeout_s: float = 10.0,
                 max_attempts: int = 3, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.calls = Calls(project_id)
        self._retry = _Retry(max_attempts=max_attempts)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(token), timeout=timeout_s,
                                       transport=transport)

    async def _send(self, call: Call) -> Any:
        for attempt in range(self._retry.max_attempts):
            last = attempt == self._retry.max_attempts - 1
            try:
                response = await self._http.request(call.method, call.path, **_request_kwargs(call))
            except httpx.TransportError:
                if last:
                    raise
                await asyncio.sleep(self._retry.delay(attempt, None))
                continue
            if response.status_code in _RETRY_STATUSES and not last:
                await asyncio.sleep(self._retry.delay(attempt, response))
                continue
            return _parse(call, response)
        raise AssertionError("unreachable")

    wallet = _async(Calls.wallet, Wallet, _DOCS["wallet"])
    balance = _async(Calls.wallet, Wallet, "Alias of wallet(): read .balance.available_minor.")
    transactions = _async(Calls.transactions, TransactionPage, _DOCS["transactions"])
    debit = _async(Calls.debit, Posting, _DOCS["debit"])
    reserve = _async(Calls.reserve, HoldResult, _DOCS["reserve"])
    commit = _async(Calls.commit, Commit, _DOCS["commit"])
    void = _async(Calls.void, HoldResult, _DOCS["void"])
    refund = _async(Calls.refund, Posting, _DOCS["refund"])
    grant = _async(Calls.grant, Posting, _DOCS["grant"])
    check_access = _async(Calls.check_access, AccessDecision, _DOCS["check_access"])

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMeterlineApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _parse(call: Call, response: httpx.Response) -> BaseModel:
    if response.status_code >= 400:
        raise problem_from_response(response)
    return call.model.model_validate(response.json())

