"""Ingestion throughput: HTTP (batches of 100 and 1,000), direct-to-Kafka SDK, and raw confluent produce.

One command, bounded in count and time, everything on 127.0.0.1:

    .venv/bin/python -m bench.ingest [--events 100000] [--concurrency 16]

It starts an embedded broker and an embedded PostgreSQL under a temporary directory, migrates, creates a
project and an ingest key, runs the API under uvicorn in its own process (uvloop, httptools, no access log),
and measures:

- raw: confluent-kafka producing one event per message as fast as it can (the ceiling of this machine);
- HTTP: POST /api/v1/events with application/cloudevents-batch+json, N concurrent clients, every request
  answered only after the broker acknowledged its events; events/s, p50/p99 request latency;
- SDK direct: ``KafkaUsageProducer.send`` (validation, packing per partition, acks awaited).

Each rate is also printed as a ratio to the raw rate measured in the same run. The load generator shares the
machine with the server and the broker, so the HTTP figure is a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.machine import describe

TIME_LIMIT_S = 120.0  # per phase


def _event(i: int, run: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"{run}-{i}", "source": "bench", "type": "tokens",
            "subject": f"wallet-{i % 1000}", "time": "2026-03-01T12:00:00.000Z",
            "data": {"tokens": 1 + i % 97, "model": "gpt-x"}}


def raw_produce(bootstrap: str, topic: str, partitions: int, n: int) -> float:
    from confluent_kafka import Producer

    from ledger.kafka import producer_config
    from streams.contracts import partition_for

    producer = Producer(producer_config(bootstrap, **{"linger.ms": 5, "queue.buffering.max.messages": 1_000_000}))
    payloads = [(orjson.dumps(_event(i, "raw")), f"wallet-{i % 1000}") for i in range(n)]
    delivered = 0

    def done(err: Any, _msg: Any) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1

    started = time.perf_counter()
    deadline = time.monotonic() + TIME_LIMIT_S
    for value, subject in payloads:
        while True:
            try:
                producer.produce(topic, value, subject.encode(), partition=partition_for(subject, partitions),
                                 on_delivery=done)
                break
            except BufferError:
                producer.poll(0.01)
        if time.monotonic() > deadline:
            break
    producer.flush(60)
    elapsed = time.perf_counter() - started
    return delivered / elapsed


async def http_load(base_url: str, token: str, *, batch: int, events: int, concurrency: int
                    ) -> tuple[float, list[float], int]:
    """N keep-alive connections, each sending pre-serialized HTTP/1.1 requests one at a time.

    A minimal client on asyncio streams instead of httpx: on this 2-core machine the load generator competes
    with the server for CPU, and httpx costs more per request than the server does."""
    host, port = base_url.removeprefix("http://").split(":")
    run = uuid.uuid4().hex[:6]
    head = (f"POST /api/v1/events HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/cloudevents-batch+json\r\n")
    requests = []
    for start in range(0, events, batch):
        body = orjson.dumps([_event(i, run) for i in range(start, min(start + batch, events))])
        requests.append((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + TIME_LIMIT_S
    next_request = 0

    async def connection() -> None:
        nonlocal failures, next_request
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_request < len(requests) and time.monotonic() < deadline:
                request = requests[next_request]
                next_request += 1
                t0 = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                latencies.append(time.perf_counter() - t0)
                if b" 204 " not in status_line:
                    failures += 1
                    if failures <= 3:
                        print(f"  unexpected {status_line!r}: {body[:200]!r}", file=sys.stderr)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return (len(latencies) - failures) * batch / elapsed, latencies, failures


def sdk_direct(bootstrap: str, prefix: str, project: str, n: int, chunk: int = 10_000) -> float:
    from meterline.client import KafkaUsageProducer

    run = uuid.uuid4().hex[:6]
    events = [_event(i, f"sdk{run}") for i in range(n)]
    with KafkaUsageProducer(bootstrap, project, topic_prefix=prefix) as producer:
        started = time.perf_counter()
        accepted = 0
        for start in range(0, n, chunk):
            accepted += producer.send(events[start:start + chunk]).accepted
        elapsed = time.perf_counter() - started
    return accepted / elapsed


def _cpu_s(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    times = [process.cpu_times(), *(c.cpu_times() for c in process.children(recursive=True))]
    return float(sum(t.user + t.system for t in times))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def setup_tenant(database_url: str) -> tuple[str, str]:
    from api.tenancy.keys import create_api_key
    from api.tenancy.projects import create_project
    from api.tenancy.users import create_user
    from ledger.db import make_engine

    engine = make_engine(database_url, pool_size=1)
    with engine.begin() as conn:
        user = create_user(conn, email=f"bench-{uuid.uuid4().hex[:6]}@example.com", password="bench password 123")
        project = create_project(conn, name="bench", owner_user_id=user.id)
        issued = create_api_key(conn, project_id=project.id, name="bench", scopes=["ingest"])
    engine.dispose()
    return project.id, issued.token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events per HTTP scenario (bounded)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--log-mode", default="all", choices=["all", "rejected", "off"],
                        help="ingested_events log mode of the server")
    args = parser.parse_args()
    events = min(args.events, 1_000_000)

    from meterline import services
    from meterline.stack import migrate
    from meterline.topics import ensure_topics, topic_specs

    print(describe())
    root = Path(tempfile.mkdtemp(prefix="meterline-bench-ingest-"))
    broker = services.start_embedded_broker(host="127.0.0.1", port=services.free_port(), log_path=root / "broker.log")
    server: subprocess.Popen[bytes] | None = None
    try:
        database_url = services.start_embedded_postgres(root / "postgres")
        migrate(database_url)
        prefix = "bench."
        ensure_topics(broker.bootstrap, topic_specs(prefix=prefix, usage_partitions=args.partitions,
                                                    charges_partitions=1, transactions_partitions=1))
        topic = f"{prefix}usage.events.v1"
        project_id, token = setup_tenant(database_url)

        port = services.free_port()
        env = {**os.environ, "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
               "METERLINE_TOPIC_PREFIX": prefix, "API_RATE_LIMIT_PER_S": "0", "API_INGEST_LOG_MODE": args.log_mode,
               "CLICKHOUSE_URL": ""}
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
             "--log-level", "warning"], env=env, stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        services.wait_for_port("127.0.0.1", port, timeout_s=30)
        base_url = f"http://127.0.0.1:{port}"

        raw = raw_produce(broker.bootstrap, topic, args.partitions, min(events * 2, 400_000))
        print(f"raw confluent produce (1 event/message): {raw:,.0f} events/s")
        results: list[tuple[str, float, str]] = []
        for batch, concurrency in ((100, args.concurrency), (1000, max(2, args.concurrency // 4))):
            n = events if batch == 100 else events * 2
            cpu_before, wall_before = _cpu_s(server.pid), time.perf_counter()
            rate, latencies, failures = asyncio.run(http_load(base_url, token, batch=batch, events=n,
                                                              concurrency=concurrency))
            cpu_s, wall_s = _cpu_s(server.pid) - cpu_before, time.perf_counter() - wall_before
            detail = (f"p50 {_pct(latencies, 0.5):.1f} ms, p99 {_pct(latencies, 0.99):.1f} ms, "
                      f"{len(latencies)} requests x{concurrency} concurrent, {failures} failed; server CPU "
                      f"{cpu_s / max(1, len(latencies)) * 1000:.2f} ms/request ({cpu_s / wall_s:.0%} of a core)")
            results.append((f"HTTP batches of {batch}", rate, detail))
            print(f"HTTP batches of {batch}: {rate:,.0f} events/s ({detail})")
        sdk = sdk_direct(broker.bootstrap, prefix, project_id, min(events * 2, 400_000))
        results.append(("SDK direct to Kafka (packed)", sdk, "chunks of 10,000 events"))
        print(f"SDK direct: {sdk:,.0f} events/s")

        print()
        print(f"{'scenario':34} {'events/s':>12} {'x raw':>8}  notes")
        print(f"{'raw confluent produce':34} {raw:>12,.0f} {1.0:>8.2f}  one event per message, idempotent, acks=all")
        for name, rate, detail in results:
            print(f"{name:34} {rate:>12,.0f} {rate / raw:>8.2f}  {detail}")
        bar = results[0][1]
        print(f"\nfirst bar (>= 20,000 events/s over HTTP batches of 100): {'MET' if bar >= 20_000 else 'NOT MET'}"
              f" ({bar:,.0f}); ingested_events log mode: {args.log_mode}")
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        broker.stop()
        services.stop_embedded_postgres(root / "postgres")
        services.remove_tree(root)


if __name__ == "__main__":
    main()
