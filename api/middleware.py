"""HTTP hygiene for every response: request ids, security headers, a request-size limit, CORS, and the
in-process token buckets used for per-principal rate limiting.

One pure ASGI middleware does the first three (a BaseHTTPMiddleware per concern would cost a task and a
copy per request on the hot debit path). Rate limiting needs the authenticated principal, so the limiter
lives on ``app.state.rate_limiter`` and ``api.tenancy.auth`` charges it after authentication; anonymous auth
endpoints charge ``app.state.auth_rate_limiter`` per client address.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PROBLEM_JSON, ApiError
from api.settings import ApiSettings

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
# JSON never needs to run anything; HTML pages (docs, dashboard) bring their own policy.
_JSON_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class _RequestIds:
    """32 hex digits (a UUID's shape): a random per-process prefix and a counter. ``uuid4`` reads the OS random
    source, which releases the GIL on every request: with worker threads busy, the event loop then waits up to a
    switch interval (5 ms) to get it back (measured: ~1 ms per request under load)."""

    def __init__(self) -> None:
        self.pid = -1
        self.prefix = ""
        self.counter = itertools.count()

    def new(self) -> str:
        if self.pid != os.getpid():  # a forked worker draws its own prefix
            self.pid, self.prefix, self.counter = os.getpid(), os.urandom(8).hex(), itertools.count()
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds().new


class RateLimited(ApiError):
    status = 429
    code = "api.rate_limited"

    def __init__(self, detail: str, *, retry_after_s: float) -> None:
        super().__init__(detail, extra={"retry_after_s": round(retry_after_s, 3)})
        self.headers = {"Retry-After": str(max(1, int(retry_after_s + 0.999)))}


class PayloadTooLarge(ApiError):
    status = 413
    code = "api.payload_too_large"


class TokenBucketLimiter:
    """Token buckets keyed by principal: ``rate_per_s`` tokens refill per second up to ``burst``.

    In-process (one bucket set per API process): with N processes the effective limit is N× — good enough to
    stop a runaway client; a shared limiter belongs in front of the fleet. Memory is bounded: the least
    recently used keys are dropped past ``keys_max`` (a dropped key just starts again with a full bucket)."""

    def __init__(self, *, rate_per_s: float, burst: int, keys_max: int = 100_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1, burst)
        self.keys_max = keys_max
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, key: str, *, now: float | None = None) -> float:
        """Take one token; return 0.0 when allowed, else the seconds until a token is available."""
        if not self.enabled:
            return 0.0
        t = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), t))
            tokens = min(float(self.burst), tokens + (t - last) * self.rate_per_s)
            if tokens >= 1.0:
                wait = 0.0
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate_per_s
            self._buckets[key] = (tokens, t)
            while len(self._buckets) > self.keys_max:
                self._buckets.popitem(last=False)
        return wait

    def check(self, key: str) -> None:
        wait = self.take(key)
        if wait > 0:
            raise RateLimited("too many requests; retry after the time in Retry-After", retry_after_s=wait)


def _problem_bytes(status: int, code: str, detail: str, path: str) -> bytes:
    return orjson.dumps({"type": f"https://meterline.dev/problems/{code}",
                         "title": code.split(".")[-1].replace("_", " "), "status": status,
                         "detail": detail, "code": code, "instance": path})


class HttpHygieneMiddleware:
    """Request id in and out, security headers on every response, and the request body size limit (413).

    A body with Content-Length over the limit is refused before it is read; a chunked body is buffered up
    to the limit and refused as soon as it passes it, so no handler ever sees an oversized body."""

    def __init__(self, app: ASGIApp, *, body_bytes_max: int, hsts: bool) -> None:
        self.app = app
        self.body_bytes_max = body_bytes_max
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        content_length: int | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_REQUEST_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
        request_id = request_id or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        rid = request_id.encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
                headers.append((b"x-request-id", rid))
                headers.extend(_SECURITY_HEADERS)
                content_type = next((v for k, v in headers if k == b"content-type"), b"")
                if b"json" in content_type:
                    headers.append(_JSON_CSP)
                    headers.append((b"cache-control", b"no-store"))
                if self.hsts:
                    headers.append(_HSTS)
                message = {**message, "headers": headers}
            await send(message)

        if content_length is not None and content_length > self.body_bytes_max:
            await self._refuse_too_large(scope, send_with_headers)
            return
        if content_length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._buffer_limited(receive)
            if body is None:
                await self._refuse_too_large(scope, send_with_headers)
                return
            receive = replay_body(body, receive)
        await self.app(scope, receive, send_with_headers)

    async def _buffer_limited(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.body_bytes_max:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse_too_large(self, scope: Scope, send: Send) -> None:
        body = _problem_bytes(413, PayloadTooLarge.code,
                              f"the request body is larger than {self.body_bytes_max} bytes", scope.get("path", ""))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM_JSON.encode()),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read ``body`` to the app, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install_middleware(app: FastAPI, inner: Sequence[Callable[[ASGIApp], ASGIApp]] = ()) -> None:
    """Called by create_app. Middleware added last runs first: CORS answers preflights before anything else.

    ``inner``: ASGI middleware that runs inside the hygiene middleware (ids, headers, body limit apply to it),
    innermost first — the debit fast lane (``api.wallets.fast_debit``). The app factory passes it, so this
    shared module imports no domain (and the fast lane can import ``replay_body`` from here without a loop)."""
    settings: ApiSettings = app.state.settings
    app.state.rate_limiter = TokenBucketLimiter(rate_per_s=settings.rate_limit_per_s,
                                                burst=settings.rate_limit_burst)
    app.state.auth_rate_limiter = TokenBucketLimiter(rate_per_s=settings.auth_rate_limit_per_s,
                                                     burst=settings.auth_rate_limit_burst)
    for middleware in inner:
        app.add_middleware(middleware)  # inside the hygiene middleware: ids, headers, body limit apply
    app.add_middleware(HttpHygieneMiddleware, body_bytes_max=settings.request_body_bytes_max,
                       hsts=settings.env != "local")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,  # bearer tokens, never cookies
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Location"],
            max_age=600,
        )


def request_id_of(scope_state: Any) -> str | None:
    """The request id the middleware assigned (``request.state``)."""
    return getattr(scope_state, "request_id", None)
