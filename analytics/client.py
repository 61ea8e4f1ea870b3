"""ClickHouse connections: one code path for the embedded engine (chDB) and a ClickHouse server.

- ``chdb:///abs/path``: clickhouse-connect's in-process chDB backend. Only ONE process may open a path
  (a second one fails to start its engine); threads of that process may each hold a client on it.
- ``http(s)://user:pass@host:port``: a server; any number of processes connect.

Tables are always written fully qualified (``db.table``), so a client never depends on a USE state and the
database may be created after connecting."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from analytics.errors import NotConfigured


def connect(url: str, **settings: Any) -> Client:
    if not url:
        raise NotConfigured("CLICKHOUSE_URL is not set; analytics needs chdb:///abs/path or http(s)://host")
    if url.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=url, settings=settings or None)
    # http(s): the server keeps sessions per id; none are needed (every statement is self-contained).
    return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False, settings=settings or None)


class ClientPool:
    """A bounded pool of clients for concurrent request threads (a client runs one statement at a time)."""

    def __init__(self, url: str, *, size: int, **settings: Any) -> None:
        self._url = url
        self._settings = settings
        self._size = size
        self._idle: queue.LifoQueue[Client] = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def client(self, *, timeout_s: float = 30.0) -> Iterator[Client]:
        client = self._take(timeout_s)
        try:
            yield client
        finally:
            if self._closed:
                client.close()
            else:
                self._idle.put(client)

    def _take(self, timeout_s: float) -> Client:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._created < self._size:
                self._created += 1
                try:
                    return connect(self._url, **self._settings)
                except BaseException:
                    self._created -= 1
                    raise
        return self._idle.get(timeout=timeout_s)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
