"""The debit's fast lane: ``POST /api/v1/projects/{p}/wallets/{w}/debit`` answered without FastAPI's routing
and dependency machinery (measured: ~0.4 ms CPU of ~0.9 ms per request in the event loop went there).

An ASGI middleware inside ``HttpHygieneMiddleware`` (so request ids, security headers and the body limit apply
as to every response). It answers only a request that would certainly reach the debit route's work with the
same inputs: JSON content, a valid Idempotency-Key, a bearer that is an API key already in the per-app
``KeyCache`` (revocation semantics unchanged) or a valid user access token, a body that validates as
``DebitRequest``, an API key whose project and scopes allow ``write``, and a token left in the caller's rate
bucket. Anything else — including every error those checks would produce — is passed on untouched (body
replayed) to the FastAPI route, which answers it exactly as before. Once taken, the request runs the route's
own ``debit_response`` (same fingerprint: method, ``request.url.path`` and the validated body), and a refusal
is answered by the app's own exception handlers, so replies are byte-for-byte the route's.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from fastapi import Request
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError
from api.middleware import replay_body
from api.tenancy.auth import API_KEY_PREFIX, DeferredAccess, project_access, verify_access_token
from api.tenancy.principal import Principal
from api.wallets.idempotency import require_key
from api.wallets.wallet_models import DebitRequest

_DEBIT_PATH = re.compile(r"^/api/v1/projects/([^/]+)/wallets/([^/]+)/debit$")


class FastDebitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        match = _DEBIT_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away before sending its body
        if not await self._answer(scope, receive, send, match, body):
            await self.app(scope, replay_body(body, receive), send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str], body: bytes) -> bool:
        """Answer the debit; False (nothing sent) when the FastAPI route must answer it."""
        authorization = idempotency_key = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"idempotency-key" and idempotency_key is None:
                idempotency_key = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value
        if content_type is None or content_type.split(b";")[0].strip() != b"application/json" or authorization is None:
            return False
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        try:
            client_key = require_key(idempotency_key)
        except ApiError:
            return False
        app: Any = scope["app"]
        state = app.state
        project_id, wallet_id = match.group(1), match.group(2)
        request_id = scope.get("state", {}).get("request_id")
        try:
            if token.startswith(API_KEY_PREFIX):
                cache = getattr(state, "key_cache", None)
                principal: Principal | None = cache.get(token, now_monotonic=time.monotonic()) if cache else None
                if principal is None:
                    return False  # the route authenticates it (and caches it)
                access = DeferredAccess(principal, project_id, "write", request_id,
                                        project_access(None, principal, project_id, "write", request_id))  # type: ignore[arg-type]
            else:
                principal = Principal(kind="user", user_id=verify_access_token(state.settings, token))
                access = DeferredAccess(principal, project_id, "write", request_id, None)
            parsed = DebitRequest.model_validate(orjson.loads(body))
        except (ApiError, ValidationError, orjson.JSONDecodeError):
            return False
        if state.rate_limiter.take(principal.rate_key) > 0:
            return False  # a refused take consumes nothing; the route refuses it again with 429
        from api.wallets.routes_wallet_ops import debit_response

        request = Request(scope, receive)
        try:
            response = await debit_response(request, access, wallet_id, parsed, client_key)
        except Exception as exc:
            handler = _handler(app, exc)
            if handler is None:
                raise  # unexpected: ServerErrorMiddleware answers 500 and logs it, as for the route
            response = await handler(request, exc)
        await response(scope, receive, send)
        return True


def _handler(app: Any, exc: Exception) -> Any:
    """The app's own handler for ``exc`` (by class, most specific first), not the catch-all."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            return handler
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body (HttpHygieneMiddleware already bounds it); None if the client went away."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
