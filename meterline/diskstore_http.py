"""HTTP/1.1 for the disk store: httptools' parser (the one uvicorn uses) under a plain asyncio protocol.

Why no web framework: the broker's produce path is a chain of store requests, one after another (per partition
batch the watermark overwrite, then the batch, then with an idempotent producer the cluster's ``meta.json``), and
the store's own work per request is small. Measured with the same trivial handler and ``bench.store_requests``'
client (one request at a time over one keep-alive connection, uvloop): aiohttp's server spent 100–135 µs of CPU in
user space per request, uvicorn with a raw ASGI app 65–92 µs, this protocol 12–18 µs; the kernel's share was the
same (~40 µs). Those ~100 µs were a third of the store's CPU per request, on the acknowledgement's path.

Scope — what Tansu's ``s3://`` client (Rust ``object_store`` over hyper) sends, and what any HTTP/1.1 client may:
keep-alive, pipelined requests (answered in order: every request is answered inside ``on_message_complete``,
because the handler never yields), bodies with Content-Length or chunked, ``Expect: 100-continue``,
``Connection: close``. A body above ``body_max`` is refused with 413, a request line and headers above
``HEAD_MAX`` with 431 (httptools buffers a header until it ends, so without a bound one endless header would grow
without limit), and a request the parser cannot read with 400; each closes the connection. A handler raises ``HttpError`` for a client error;
anything else it raises is logged and answered 500, and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl, unquote

import httptools

__all__ = ["BODY_MAX", "HEAD_MAX", "BadRequest", "HttpError", "PreconditionFailed", "Request", "Response", "serve"]

log = logging.getLogger("meterline.diskstore")

#: the largest request body accepted (aiohttp's ``client_max_size`` was set to the same)
BODY_MAX = 1024**3
#: the largest request line + headers (an S3 request's are < 2 KiB; aiohttp allowed 8 KiB per line)
HEAD_MAX = 64 * 1024
#: bytes handed to the parser at once, so a head is counted to within this much (see ``data_received``)
_FEED_BYTES = 16 * 1024

_REASONS = {s.value: s.phrase for s in HTTPStatus}


class HttpError(Exception):
    """A client error the handler answers with ``status`` and a short text."""

    status = 400

    def __init__(self, text: str = "") -> None:
        super().__init__(text or _REASONS.get(self.status, ""))
        self.text = text or _REASONS.get(self.status, "")


class BadRequest(HttpError):
    status = 400


class PreconditionFailed(HttpError):
    status = 412


class MethodNotAllowed(HttpError):
    status = 405


@dataclass(frozen=True)
class Request:
    method: str
    #: percent-decoded, without the leading "/" and the query
    path: str
    #: the query's parameters; a name without a value (``?delete``) maps to ""
    query: dict[str, str]
    #: header names in lower case
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


Handler = Callable[[Request], Response]


def _encode(method: str, response: Response, *, keep_alive: bool) -> list[bytes]:
    """Status line, headers and body. Content-Length is the body's unless the handler set it (a HEAD answers
    with the object's length and no body); 1xx/204/304 have none."""
    lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in response.headers.items()]
    if "Content-Length" not in response.headers and response.status not in (204, 304) and response.status >= 200:
        lines.append(f"Content-Length: {len(response.body)}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    if method == "HEAD" or not response.body:
        return [head]
    return [head, response.body]


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer each request as soon as it is complete, in order."""

    def __init__(self, handler: Handler, body_max: int) -> None:
        self._handler = handler
        self._body_max = body_max
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._head_bytes = 0
        self._in_head = False
        self._closing = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            # in slices: a slice fed while a request's head is unfinished counts towards HEAD_MAX whole, so
            # the count is over by at most one slice of an earlier pipelined request
            view = memoryview(data)
            for start in range(0, len(view), _FEED_BYTES):
                piece = view[start:start + _FEED_BYTES]
                self._parser.feed_data(piece)
                if self._in_head:
                    self._head_bytes += len(piece)
                    if self._head_bytes > HEAD_MAX:
                        self._refuse(431, f"the request line and headers are longer than {HEAD_MAX} bytes")
                if self._closing:
                    return
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", {}, [], 0
        self._head_bytes, self._in_head = 0, True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._body_max:
            self._refuse(413, f"the body is larger than {self._body_max} bytes")
            raise httptools.HttpParserError("body too large")  # stops this feed; the connection is closing
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing or self._transport is None:
            return
        method = self._parser.get_method().decode("latin-1")
        raw_path, _, raw_query = self._url.decode("latin-1").partition("?")
        request = Request(method=method, path=unquote(raw_path.lstrip("/")),
                          query=dict(parse_qsl(raw_query, keep_blank_values=True)), headers=self._headers,
                          body=b"".join(self._body))
        self._body = []
        try:
            response = self._handler(request)
        except HttpError as exc:
            response = Response(exc.status, {"Content-Type": "text/plain"}, exc.text.encode())
        except Exception:  # the store's own failure (a full disk…): answered, logged, the connection kept
            log.exception("store request failed: %s %s", method, request.path)
            response = Response(500, {"Content-Type": "text/plain"}, b"internal error")
        keep_alive = self._parser.should_keep_alive()
        self._transport.writelines(_encode(method, response, keep_alive=keep_alive))
        if not keep_alive:
            self._closing = True
            self._transport.close()

    def _refuse(self, status: int, text: str) -> None:
        """Answer and close: after an unreadable request the stream cannot be resynchronised."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._transport.writelines(_encode("", Response(status, {"Content-Type": "text/plain"}, text.encode()),
                                          keep_alive=False))
        self._transport.close()


async def serve(handler: Handler, host: str, port: int, *, body_max: int = BODY_MAX) -> asyncio.Server:
    """Start serving ``handler`` on ``host:port`` (port 0: any free port; read it from the server's sockets)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(handler, body_max), host, port, reuse_address=True)
