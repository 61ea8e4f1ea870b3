"""The disk store's HTTP/1.1 server (meterline/diskstore_http.py) over real sockets, byte for byte: what any
HTTP/1.1 client may send (keep-alive, pipelining, chunked bodies, Expect: 100-continue, Connection: close) is
answered in order, and what is not HTTP gets a clear error without taking the server down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from meterline.diskstore_http import HEAD_MAX, PreconditionFailed, Request, Response, serve

Scenario = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[Request]], Awaitable[Any]]


def _echo(seen: list[Request]) -> Callable[[Request], Response]:
    """Answers with what it understood, so a test can check the parse; some paths fail on purpose."""

    def handle(request: Request) -> Response:
        seen.append(request)
        if request.path == "boom":
            raise RuntimeError("the store failed")
        if request.path == "cas":
            raise PreconditionFailed()
        if request.method == "HEAD":
            return Response(200, {"Content-Length": "1234", "ETag": '"e"'})
        if request.path == "empty":
            return Response(204)
        return Response(200, {"Content-Type": "text/plain"},
                        f"{request.method} {request.path} {sorted(request.query.items())} {len(request.body)}".encode())

    return handle


def _run(scenario: Scenario, *, body_max: int = 1024**3) -> list[Request]:
    """The scenario once on asyncio's own loop and once on uvloop's (the store runs on uvloop)."""
    return [request for loop in (asyncio.new_event_loop, uvloop.new_event_loop)
            for request in _run_on(loop, scenario, body_max=body_max)]


def _run_on(new_loop: Callable[[], asyncio.AbstractEventLoop], scenario: Scenario, *, body_max: int) -> list[Request]:
    seen: list[Request] = []

    async def main() -> None:
        server = await serve(_echo(seen), "127.0.0.1", 0, body_max=body_max)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                await asyncio.wait_for(scenario(reader, writer, seen), 10)
            finally:
                writer.close()
        finally:
            server.close()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())
    return seen


async def _response(reader: asyncio.StreamReader, *, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_request or status in (100, 204, 304) else int(headers.get("content-length", 0))
    return status, headers, await reader.readexactly(length)


def test_pipelined_requests_on_one_connection_are_answered_in_order() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"PUT /b/k%201?x=1 HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\nIf-Match: \"e\"\r\n\r\nhello"
                     b"GET /b?list-type=2&prefix=a%2Fb&delete HTTP/1.1\r\nHost: s\r\n\r\n"
                     b"DELETE /empty HTTP/1.1\r\nHost: s\r\n\r\n")
        await writer.drain()
        assert await _response(reader) == (200, {"content-type": "text/plain", "content-length": "24"},
                                           b"PUT b/k 1 [('x', '1')] 5")
        status, _, body = await _response(reader)
        assert (status, body) == (200, b"GET b [('delete', ''), ('list-type', '2'), ('prefix', 'a/b')] 0")
        status, headers, body = await _response(reader)
        assert (status, body) == (204, b"") and "content-length" not in headers
        assert seen[0].headers["if-match"] == '"e"' and seen[0].body == b"hello"  # names in lower case

    _run(scenario)


def test_chunked_bodies_and_expect_continue() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"PUT /b/c HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        await writer.drain()
        assert (await _response(reader))[0] == 200 and seen[-1].body == b"abcdefg"
        writer.write(b"PUT /b/e HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        assert (await _response(reader))[0] == 100  # the client may now send the body
        writer.write(b"ok")
        await writer.drain()
        assert (await _response(reader))[0] == 200 and seen[-1].body == b"ok"

    _run(scenario)


def test_head_answers_the_objects_length_without_a_body() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"HEAD /b/k HTTP/1.1\r\nHost: s\r\n\r\nGET /empty HTTP/1.1\r\nHost: s\r\n\r\n")
        await writer.drain()
        status, headers, _ = await _response(reader, head_request=True)
        assert (status, headers["content-length"]) == (200, "1234")
        assert (await _response(reader))[0] == 204  # the next answer starts right after the HEAD's headers

    _run(scenario)


def test_errors_are_answered_and_the_connection_stays_usable() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"GET /boom HTTP/1.1\r\nHost: s\r\n\r\nPUT /cas HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\n\r\n"
                     b"GET /b/after HTTP/1.1\r\nHost: s\r\n\r\n")
        await writer.drain()
        assert (await _response(reader))[0] == 500
        assert (await _response(reader))[0] == 412
        status, _, body = await _response(reader)
        assert (status, body) == (200, b"GET b/after [] 0")

    _run(scenario)


def test_connection_close_is_honoured() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"GET /b/x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status, headers, _ = await _response(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await reader.read() == b""  # closed by the server

    _run(scenario)


def test_what_is_not_http_gets_400_and_a_closed_connection() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"\x16\x03\x01 this is a TLS hello, not HTTP\r\n\r\n")
        await writer.drain()
        status, _, body = await _response(reader)
        assert status == 400 and b"malformed request" in body
        assert await reader.read() == b""
        assert seen == []

    _run(scenario)


def test_a_body_above_the_bound_is_refused_with_413() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        writer.write(b"PUT /b/big HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
        await writer.drain()
        status, _, body = await _response(reader)
        assert status == 413 and b"larger than 64 bytes" in body
        assert seen == []  # never handed to the store

    _run(scenario, body_max=64)


def test_an_endless_header_is_refused_with_431_and_a_big_body_is_not_mistaken_for_one() -> None:
    """httptools buffers a header until it ends: the server bounds the request line and headers (HEAD_MAX), and
    only those — a body of many times that size, pipelined with the next request, is served."""

    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Request]) -> None:
        body = b"y" * (HEAD_MAX * 4)
        writer.write(b"PUT /b/big HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                     + b"GET /b/next HTTP/1.1\r\nHost: s\r\nX-Long: " + b"a" * (HEAD_MAX // 2) + b"\r\n\r\n")
        await writer.drain()
        status, _, answer = await _response(reader)
        assert (status, answer) == (200, b"PUT b/big [] %d" % len(body))
        assert (await _response(reader))[0] == 200 and seen[-1].path == "b/next"  # a long header under the bound
        writer.write(b"GET /b/endless HTTP/1.1\r\nHost: s\r\nX-Endless: ")
        for _ in range(8):  # HEAD_MAX * 2 in all, in pieces, never ending the header
            writer.write(b"z" * (HEAD_MAX // 4))
        await writer.drain()
        status, _, answer = await _response(reader)
        assert status == 431 and b"longer than" in answer
        assert await reader.read() == b""
        assert [r.path for r in seen][-1] == "b/next"  # the endless request never reached the handler

    _run(scenario)
