"""HTTP hygiene for every response: request ids, security headers, a request-size limit, CORS, and the
in-process token buckets used for per-principal rate limiting.

One pure ASGI middleware does the first three (a BaseHTTPMiddleware per concern would cost a task and a
copy per request on the hot debit path). Rate limiting needs the authenticated principal, so the limiter
lives on ``app.state.rate_limiter`` and ``api.tenancy.auth`` charges it after authentication; anonymous auth
endpoints charge ``app.state.auth_rate_limiter`` per client address.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PROBLEM_JSON, ApiError, internal_error_body
from api.settings import ApiSettings

log = logging.getLogger("meterline.api")

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
# The interactive docs (Swagger UI at /docs, ReDoc at /redoc): their own scripts and styles — served by the API
# itself or by FastAPI's default CDN — plus the one inline bootstrap script FastAPI writes; nothing else, no
# framing, no form posts, no plugins.
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
_DOCS_CSP = (b"content-security-policy",
             b"default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
             b"style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
             b"img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
             b"font-src 'self' https://fonts.gstatic.com; connect-src 'self'; worker-src 'self' blob:; "
             b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'")


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
        is_docs = scope.get("path") in DOCS_PATHS
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
                headers.append((b"x-request-id", rid))
                headers.extend(_SECURITY_HEADERS)
                content_type = next((v for k, v in headers if k == b"content-type"), b"")
                if b"json" in content_type:
                    headers.append(_JSON_CSP)
                    headers.append((b"cache-control", b"no-store"))
                elif is_docs and not any(k == b"content-security-policy" for k, _ in headers):
                    headers.append(_DOCS_CSP)
                if self.hsts:
                    headers.append(_HSTS)
                message = {**message, "headers": headers}
            await send(message)

        refusal = _nul_refusal(scope)
        if refusal is not None:
            await _send_problem(send_with_headers, *refusal, scope.get("path", ""), close=False)
            return
        if content_length is not None and content_length > self.body_bytes_max:
            await self._refuse_too_large(scope, send_with_headers)
            return
        if content_length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._buffer_limited(receive)
            if body is None:
                await self._refuse_too_large(scope, send_with_headers)
                return
            receive = replay_body(body, receive)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log_unexpected(exc, request_id=request_id, method=scope.get("method", ""), path=scope.get("path", ""))
            if started:
                raise  # the response is half sent: only closing the connection can tell the client
            body = orjson.dumps(internal_error_body(scope.get("path", ""), request_id))
            await send_with_headers({"type": "http.response.start", "status": 500,
                                     "headers": [(b"content-type", PROBLEM_JSON.encode()),
                                                 (b"content-length", str(len(body)).encode())]})
            await send_with_headers({"type": "http.response.body", "body": body})

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
        await _send_problem(send, 413, PayloadTooLarge.code,
                            f"the request body is larger than {self.body_bytes_max} bytes", scope.get("path", ""),
                            close=True)


async def _send_problem(send: Send, status: int, code: str, detail: str, path: str, *, close: bool) -> None:
    body = _problem_bytes(status, code, detail, path)
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    if close:  # the unread body is still on the wire
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _nul_refusal(scope: Scope) -> tuple[int, str, str] | None:
    """A NUL in the path names no resource (404); in the query string it is an invalid value (422). Checked
    before routing so no path or query parameter — and no static file lookup — ever sees one."""
    if "\x00" in scope.get("path", ""):
        return 404, "http.404", "Not Found"
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        return 422, "api.validation_failed", "query parameters must not contain NUL (%00)"
    return None


def log_unexpected(exc: BaseException, *, request_id: str, method: str, path: str) -> None:
    """One ERROR line per unexpected error: its class and where it was raised, never its message or locals
    (a database error's text carries the SQL's bound parameters — a password hash, a token digest)."""
    frames = "".join(traceback.format_tb(exc.__traceback__)[-8:])
    log.error("unexpected %s in %s %s (request %s)\n%s", type(exc).__qualname__, method, path, request_id,
              frames.rstrip())


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
    app.state.webhook_rate_limiter = TokenBucketLimiter(rate_per_s=settings.webhook_rate_limit_per_s,
                                                        burst=settings.webhook_rate_limit_burst)
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
