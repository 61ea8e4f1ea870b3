"""What one request costs the embedded broker's disk store, by kind, one command:

    .venv/bin/python -m bench.store_requests [--requests 4000] [--body-bytes 700] [--unlinked-before 0]

Starts ``meterline.diskstore`` alone on a temporary directory and sends it, one at a time over one keep-alive
connection (as Tansu does within a produce), ``--requests`` requests of each kind in turn: PUTs of new keys while the
store has no spare file (every write creates a file), PUTs over one existing key (what ``watermark.json`` gets per
produced batch), DELETEs of the new keys (each becomes a spare), then PUTs of new keys again (now into spares). Prints
per kind the round trip and the store's CPU per request, user and kernel, and the machine. ``--unlinked-before N``
first creates and unlinks N files on the same filesystem: on an ext4 without a journal a new inode is then searched
for past the recently freed ones, as in a store that frees files while it runs (meterline/diskstore_files.py). Why it matters: Tansu
writes each partition's batch of a produce request as two such PUTs one after the other, so the broker's capacity is
requests per second, not bytes (docs/benchmarks.md "producers without a bound on requests in flight").
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.machine import describe
from meterline.services import free_port

_RECORDS = "/tansu/clusters/c/topics/t/partitions/0/records"


class Connection:
    """A minimal keep-alive HTTP/1.1 client: the bench must cost the store, not itself (an HTTP library's own
    time per request would be most of the round trip)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: store\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                          + body)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the store closed the connection")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return int(head.split(b" ", 2)[1])


def _wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"the store did not listen on {port} within {timeout_s:g} s")


def _free_inodes(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    for i in range(count):
        (directory / str(i)).write_bytes(b"x")
    for i in range(count):
        (directory / str(i)).unlink()


def run(*, requests: int, body_bytes: int, unlinked_before: int = 0) -> None:
    body = b"b" * body_bytes
    with tempfile.TemporaryDirectory(prefix="store-requests-") as home:
        if unlinked_before:
            _free_inodes(Path(home, "freed"), unlinked_before)
            print(f"{unlinked_before:,} files created and unlinked just before")
        port = free_port("127.0.0.1")
        store = subprocess.Popen([sys.executable, "-m", "meterline.diskstore", "--root", str(Path(home, "store")),
                                  "--port", str(port), "--merge-after-s", "0"])
        try:
            _wait_listening(port)
            conn, process = Connection(port), psutil.Process(store.pid)
            kinds: list[tuple[str, str, Callable[[int], str], int]] = [("PUT, new key, no spare file", "PUT", lambda i: f"{_RECORDS}/{i:020d}.batch", 200),
                     ("PUT over one existing key", "PUT", lambda i: f"{_RECORDS}/../watermark.json", 200),
                     ("DELETE (the file becomes a spare)", "DELETE", lambda i: f"{_RECORDS}/{i:020d}.batch", 204),
                     ("PUT, new key, into a spare", "PUT", lambda i: f"{_RECORDS}/{requests + i:020d}.batch", 200)]
            print(f"{requests:,} requests of each kind, one at a time over one connection, {body_bytes:,}-byte bodies")
            for label, method, path, ok in kinds:
                before, started = process.cpu_times(), time.perf_counter()
                for i in range(requests):
                    status = conn.request(method, path(i).replace("/records/../", "/"),
                                          body if method == "PUT" else b"")
                    if status != ok:
                        raise RuntimeError(f"{label}: the store answered {status}")
                elapsed, after = time.perf_counter() - started, process.cpu_times()
                user, system = after.user - before.user, after.system - before.system
                print(f"  {label:36s} round trip {elapsed / requests * 1e6:6.0f} µs; store CPU "
                      f"{(user + system) / requests * 1e6:5.0f} µs per request (user {user / requests * 1e6:4.0f}, "
                      f"kernel {system / requests * 1e6:4.0f})")
        finally:
            store.terminate()
            store.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4_000, help="requests of each kind (bounded: at most 100,000)")
    parser.add_argument("--body-bytes", type=int, default=700, help="bytes per PUT (a one-event batch is ~700)")
    parser.add_argument("--unlinked-before", type=int, default=0,
                        help="files created and unlinked on the same filesystem first (at most 100,000)")
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000:
        parser.error("--requests must be between 1 and 100,000")
    if not 0 <= args.unlinked_before <= 100_000:
        parser.error("--unlinked-before must be between 0 and 100,000")
    if not 0 <= args.body_bytes <= 16 * 1024 * 1024:
        parser.error("--body-bytes must be between 0 and 16 MiB")
    print(describe())
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    run(requests=args.requests, body_bytes=args.body_bytes, unlinked_before=args.unlinked_before)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
