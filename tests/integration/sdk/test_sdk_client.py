"""The Python SDK and the events CLI against a real uvicorn server, the real broker and PostgreSQL.

The "dropped connection" is real: a TCP proxy between the SDK and the server forwards the request, lets the
server accept it, and closes the client's socket instead of relaying the response — the case where a client
cannot know whether its events landed. The SDK retries with the SAME event ids, so the topic holds the same
events more than once (which the pipeline's (project, source, id) dedupe collapses), never new ids."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))  # the shared ingest test kit
from ingest_testkit import Tenant, all_events, consume, make_app, new_tenant, serve, usage_topic

from meterline.client import KafkaUsageProducer, MeterlineClient, RetryPolicy, usage_event
from streams.contracts import partition_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(database_url: str, topics: Any) -> Iterator[str]:
    app = make_app(database_url, bootstrap=topics.bootstrap, topic_prefix=topics.prefix)
    with serve(app) as base_url:
        yield base_url


@pytest.fixture
def tenant(server: str) -> Tenant:
    with httpx.Client(base_url=server, timeout=30) as http:
        return new_tenant(http, keys={"ingest": ["ingest"]})


class DroppingProxy:
    """127.0.0.1 TCP proxy; the first ``drops`` upstream responses are swallowed and the client socket closed."""

    def __init__(self, upstream_port: int, drops: int) -> None:
        self.upstream_port = upstream_port
        self.drops = drops
        self.dropped = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, is_response: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if is_response:
                    with self._lock:
                        drop = self.dropped < self.drops
                        if drop:
                            self.dropped += 1
                    if drop:  # the server has accepted the request; the client never hears about it
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def test_client_batches_and_every_event_reaches_its_partition(server: str, tenant: Tenant, topics: Any) -> None:
    events = [usage_event(type="tokens", subject=f"user-{i % 13}", data={"tokens": i}) for i in range(1250)]
    with MeterlineClient(server, tenant.keys["ingest"], batch_size=500) as client:
        result = client.send(events)
        tracked = [client.track(type="tokens", subject="user-x", data={"tokens": 1}) for _ in range(7)]
    assert (result.accepted, result.requests, result.retries, result.rejected) == (1250, 3, 0, [])
    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=1257)
    got = Counter(e["id"] for e in all_events(consumed))
    assert set(got) == {e["id"] for e in events} | set(tracked) and max(got.values()) == 1
    for message in consumed:
        for event in message.events:
            assert message.partition == partition_for(event["subject"], topics.usage_partitions)
            assert event["project"] == tenant.project_id


def test_retry_after_a_dropped_connection_resends_the_same_ids(server: str, tenant: Tenant, topics: Any) -> None:
    proxy = DroppingProxy(int(server.rsplit(":", 1)[1]), drops=2)
    try:
        events = [usage_event(type="tokens", subject=f"user-{i % 5}", data={"tokens": 1}) for i in range(300)]
        sleeps: list[float] = []
        with MeterlineClient(f"http://127.0.0.1:{proxy.port}", tenant.keys["ingest"], batch_size=100,
                             retry=RetryPolicy(backoff_base_s=0.05), sleep=sleeps.append, seed=7) as client:
            result = client.send(events)
    finally:
        proxy.close()
    assert proxy.dropped == 2
    assert result.accepted == 300 and result.retries == 2 and result.rejected == []
    assert len(sleeps) == 2 and all(0 <= s <= 0.1 for s in sleeps)  # full jitter within base·2^attempt

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=500, timeout_s=20)
    delivered = all_events(consumed)
    by_id = Counter(e["id"] for e in delivered)
    assert set(by_id) == {e["id"] for e in events}  # no new ids were minted by the retries
    # both drops hit the first batch (its first resend was dropped too): it landed 3 times, the rest once
    assert Counter(by_id.values()) == Counter({3: 100, 1: 200}) and len(delivered) == 500
    first_seen: dict[str, dict[str, Any]] = {}
    for event in delivered:  # a resend is the same event, byte for byte in every attribute
        assert first_seen.setdefault(event["id"], event) == event


def test_direct_kafka_producer_packs_per_partition(tenant: Tenant, topics: Any) -> None:
    events: list[dict[str, Any]] = [usage_event(type="tokens", subject=f"acct-{i % 20}", data={"tokens": 2})
                                    for i in range(300)]
    events.insert(17, {"id": "bad", "type": "tokens", "source": "x"})  # no subject
    with KafkaUsageProducer(topics.bootstrap, tenant.project_id, topic_prefix=topics.prefix) as producer:
        result = producer.send(events)
    assert result.accepted == 300 and [r["index"] for r in result.rejected] == [17]
    assert result.requests <= topics.usage_partitions  # one packed message per partition
    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=300)
    assert len(consumed) == result.requests
    delivered = all_events(consumed)
    assert sorted(e["id"] for e in delivered) == sorted(e["id"] for e in events if e["id"] != "bad")
    for message in consumed:
        assert {partition_for(e["subject"], topics.usage_partitions) for e in message.events} == {message.partition}
        assert all(e["project"] == tenant.project_id for e in message.events)


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterline", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_cli_send_and_loadgen_refuses_remote_hosts(server: str, tenant: Tenant, topics: Any, tmp_path: Path) -> None:
    lines = [orjson.dumps(usage_event(type="tokens", subject=f"c{i % 3}", data={"tokens": i})).decode()
             for i in range(30)]
    lines[4] = orjson.dumps({"id": "broken", "source": "cli", "type": "tokens"}).decode()
    lines[9] = orjson.dumps({**orjson.loads(lines[9]), "time": "nope"}).decode()
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = _cli(["events", "send", str(path), "--url", server, "--batch-size", "8"],
                METERLINE_API_KEY=tenant.keys["ingest"])
    assert done.returncode == 1, done.stderr  # some events were rejected
    assert "#4" in done.stderr and "#9" in done.stderr
    assert "28" in done.stdout and "2" in done.stdout

    array = tmp_path / "events.json"
    array.write_text(orjson.dumps([usage_event(type="tokens", subject="arr", data={"tokens": 1})
                                   for _ in range(5)]).decode())
    done = _cli(["events", "send", str(array), "--url", server], METERLINE_API_KEY=tenant.keys["ingest"])
    assert done.returncode == 0, done.stderr

    # loadgen against a pipeline: tests/integration/pipeline/test_loadgen.py
    refused = _cli(["loadgen", "--url", "http://example.com:8080", "--max-events", "1"],
                   METERLINE_API_KEY=tenant.keys["ingest"])
    assert refused.returncode == 2 and "127.0.0.1" in refused.stderr

    consumed = consume(topics.bootstrap, usage_topic(topics.prefix), expect_events=28 + 5)
    assert len(all_events(consumed)) == 33
