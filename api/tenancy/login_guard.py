"""Limits on password logins: per client network, per account, a cap on concurrent password checks, and a
lockout with exponential backoff.

Why each, stated:
- **Per network** (``network_key``): an IPv6 client owns at least a /64, so per-address buckets would hand it
  2^64 fresh ones; IPv6 is keyed by its /64 (IPv4-mapped addresses count as IPv4).
- **Per account** (``LoginGuard``): many addresses guessing one account's password are limited by the account
  (a token bucket) and, after ``lockout_after`` consecutive failures, locked for ``base_s × 2^k`` up to
  ``max_s``. Unknown emails are counted exactly like known ones, so the answers (401, then 429) never tell
  whether an account exists. A success resets the account.
- **Concurrent password checks** (``PasswordGate``): argon2id uses 64 MiB per hash or verification; 30 at once
  took the API from 564 to 1,833 MiB. At most ``password_checks_max`` run at a time; a caller that cannot get
  a slot within ``password_check_wait_s`` gets 503 + Retry-After instead of piling up (it holds no database
  connection while it waits: the gate is a route dependency that runs before the connection is taken).

All of it is in-process (like the rate limiter, api/middleware.py): with N API processes the limits are N×, and
a restart forgets lockouts. Memory is bounded (least recently used entries dropped).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request

from api.errors import Unavailable
from api.middleware import RateLimited, TokenBucketLimiter
from api.settings import ApiSettings


def network_key(host: str) -> str:
    """The rate-limit key of a client address: an IPv4 address as is, an IPv6 address by its /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"host:{host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip6:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


@dataclass
class _Account:
    failures: int = 0
    locked_until: float = 0.0


class LoginGuard:
    """Per-account bucket and lockout. ``check`` before the password is verified, then ``failed`` or
    ``succeeded``. Keys are normalized emails (known or not)."""

    def __init__(self, *, rate_per_s: float, burst: int, lockout_after: int, base_s: float, max_s: float,
                 accounts_max: int = 100_000) -> None:
        self.bucket = TokenBucketLimiter(rate_per_s=rate_per_s, burst=burst, keys_max=accounts_max)
        self.lockout_after = lockout_after
        self.base_s = base_s
        self.max_s = max_s
        self.accounts_max = accounts_max
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, email: str, *, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        with self._lock:
            account = self._accounts.get(email)
            wait = account.locked_until - t if account is not None else 0.0
        if wait > 0:
            raise RateLimited("too many failed logins for this account; retry after the time in Retry-After",
                              retry_after_s=wait)
        wait = self.bucket.take(f"acct:{email}", now=t)
        if wait > 0:
            raise RateLimited("too many logins for this account; retry after the time in Retry-After",
                              retry_after_s=wait)

    def failed(self, email: str, *, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        with self._lock:
            account = self._accounts.pop(email, None) or _Account()
            account.failures += 1
            over = account.failures - self.lockout_after
            if over >= 0:
                account.locked_until = t + min(self.max_s, self.base_s * (2 ** min(over, 30)))
            self._accounts[email] = account
            while len(self._accounts) > self.accounts_max:
                self._accounts.popitem(last=False)

    def succeeded(self, email: str) -> None:
        with self._lock:
            self._accounts.pop(email, None)


class PasswordGate:
    """At most ``slots`` argon2 operations at a time in this process."""

    def __init__(self, *, slots: int, wait_s: float) -> None:
        self._semaphore = threading.BoundedSemaphore(max(1, slots))
        self.wait_s = wait_s

    def acquire(self) -> bool:
        return self._semaphore.acquire(timeout=self.wait_s)

    def release(self) -> None:
        self._semaphore.release()


def _password_slot(request: Request) -> Iterator[None]:
    """A sync dependency (FastAPI runs it in a worker thread, before the route's connection is taken)."""
    gate: PasswordGate | None = getattr(request.app.state, "password_gate", None)
    if gate is None:
        yield
        return
    if not gate.acquire():
        raise PasswordChecksBusy("too many password checks in progress; retry shortly")
    try:
        yield
    finally:
        gate.release()


class PasswordChecksBusy(Unavailable):
    code = "api.password_checks_busy"
    headers = {"Retry-After": "1"}


PasswordSlot = Depends(_password_slot)


def install(app_state: Any, settings: ApiSettings) -> None:
    """Build the guard and the gate from the settings (called by the auth router's startup)."""
    app_state.login_guard = LoginGuard(
        rate_per_s=settings.login_account_rate_limit_per_s, burst=settings.login_account_rate_limit_burst,
        lockout_after=settings.login_lockout_after, base_s=settings.login_lockout_base_s,
        max_s=settings.login_lockout_max_s)
    app_state.password_gate = PasswordGate(slots=settings.password_checks_max, wait_s=settings.password_check_wait_s)
