"""Reading a payment provider's REST API for the receipts reconciliation: one GET, its failures classified.

Every failure is a ``ProviderApiError`` with a stable ``kind`` (``rate_limited``, ``server_error``,
``client_error``, ``bad_json``, ``network``) that the job reports; nothing here writes anything, so a failed
read loses nothing — the next run reads again. A 5xx or a network error is retried once; a 429 is waited out
once when its ``Retry-After`` is short (``retry_after_max_s``), else it is reported with the wait asked for."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

RETRY_PAUSE_S = 0.2


class ProviderApiError(Exception):
    def __init__(self, kind: str, detail: str, *, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s

    def report(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "status": self.status, "retry_after_s": self.retry_after_s}


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: treat as "long"


@dataclass
class ProviderApi:
    """GETs against one provider with one credential; counts its requests (for the report)."""

    base_url: str
    headers: dict[str, str]
    timeout_s: float
    retry_after_max_s: float
    requests: int = 0

    def __post_init__(self) -> None:
        self._client = httpx.Client(timeout=self.timeout_s, headers=self.headers, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def get(self, path_or_url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else \
            self.base_url.rstrip("/") + path_or_url
        waited = retried = False
        while True:
            self.requests += 1
            try:
                response = self._client.get(url, params=params)
            except httpx.HTTPError as exc:
                if not retried:
                    retried = True
                    time.sleep(RETRY_PAUSE_S)
                    continue
                raise ProviderApiError("network", f"GET {_path(url)}: {type(exc).__name__}: {exc}"[:300]) from None
            if response.status_code == 429:
                after = _retry_after(response.headers.get("Retry-After"))
                if not waited and after is not None and after <= self.retry_after_max_s:
                    waited = True
                    time.sleep(after)
                    continue
                raise ProviderApiError("rate_limited", f"GET {_path(url)} answered 429 (Retry-After "
                                       f"{response.headers.get('Retry-After')!r})", status=429, retry_after_s=after)
            if response.status_code >= 500:
                if not retried:
                    retried = True
                    time.sleep(RETRY_PAUSE_S)
                    continue
                raise ProviderApiError("server_error", f"GET {_path(url)} answered {response.status_code}",
                                       status=response.status_code)
            if response.status_code >= 400:
                raise ProviderApiError("client_error", f"GET {_path(url)} answered {response.status_code}: "
                                       f"{response.text[:200]}", status=response.status_code)
            try:  # prices have fractions (RevenueCat): Decimal, never float
                body = json.loads(response.content, parse_float=Decimal)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise ProviderApiError("bad_json", f"GET {_path(url)} answered a body that is not JSON",
                                       status=response.status_code) from None
            if not isinstance(body, dict):
                raise ProviderApiError("bad_json", f"GET {_path(url)} answered JSON that is not an object",
                                       status=response.status_code)
            return body


def _path(url: str) -> str:
    """The URL without its host (reports never show credentials, and the host is the configured one)."""
    parsed = httpx.URL(url)
    return parsed.raw_path.decode(errors="replace")[:200]
