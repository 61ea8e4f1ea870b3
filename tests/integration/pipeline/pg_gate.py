"""A TCP gate in front of PostgreSQL for one process of a pipeline test: while closed, bytes stop flowing both
ways (connections stay open, queries simply wait), so a streams worker that took a batch blocks in its first
catalog probe with the batch in hand — a deterministic "frozen between metering and emitting" point that
does not depend on when librdkafka notices a rebalance."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import quote

from sqlalchemy.engine import make_url


class PostgresGate:
    def __init__(self, database_url: str) -> None:
        self._url = make_url(database_url)
        host = self._url.query.get("host") or self._url.host or "127.0.0.1"
        if isinstance(host, tuple):
            host = host[0]
        port = self._url.port or 5432
        self._target: tuple[int, object] = ((socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/")
                                            else (socket.AF_INET, (host, port)))
        self._open = threading.Event()
        self._open.set()
        self._closed_for_good = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, name="pg-gate", daemon=True).start()

    @property
    def url(self) -> str:
        """The database URL that goes through the gate (same database, user and driver)."""
        port = self._listener.getsockname()[1]
        user = quote(self._url.username or "", safe="")
        password = f":{quote(self._url.password, safe='')}" if self._url.password else ":"
        return f"{self._url.drivername}://{user}{password}@127.0.0.1:{port}/{self._url.database}"

    def close_gate(self) -> None:
        self._open.clear()

    def open_gate(self) -> None:
        self._open.set()

    def shutdown(self) -> None:
        self._closed_for_good = True
        self._open.set()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed_for_good:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            family, address = self._target
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(address)  # type: ignore[arg-type]
            self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65_536)
                if not data:
                    break
                self._open.wait()  # gate closed: hold what arrived until it opens
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
