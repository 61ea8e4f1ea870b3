"""The embedded broker's produce latency on disk, one event per message, one command:

    .venv/bin/python -m bench.broker_produce [--rate 10000] [--seconds 20] [--client idempotent] [--spare-files 0]
                                           [--fresh-files 0]

Starts the embedded broker with durable topics (Tansu over meterline/diskstore.py) in a temporary directory,
creates an 8-partition topic and sends ``--rate`` messages/s for ``--seconds`` from one plain confluent producer
(the settings and message shape of ``bench.pipeline --pack 1``: idempotent, acks=all, linger 5 ms, lz4, keyed by
subject over 1,000 subjects, murmur2). Prints the send→acknowledged latency (p50/p90/p99/max) over the run after
its first ``--warmup-s`` and per ``--window-s`` window, the CPU of the broker and of its disk store, and the machine.
``--spare-files 0`` runs the store without reusing files (a new file per write, the old one unlinked), to compare;
``--fresh-files 0`` without the thread that creates files ahead of need (a write that finds no spare creates one).
``--client`` picks the producer's settings: ``idempotent`` (the default above: Java's default, what
``bench.pipeline`` sends with), ``librdkafka-default`` (librdkafka's own defaults: no idempotence and up to 1,000,000
requests in flight per connection — what a plain confluent-kafka client sends with unless told otherwise) or
``meterline`` (``ledger.kafka.producer_config`` as ``meterline up`` runs it: no idempotence on the embedded broker).
``--past-producers N`` first leaves N idempotent producers' entries in the broker's cluster metadata (what N producer
instances that came and went leave behind: Tansu keeps them all and rewrites the object for every batch).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psutil
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.machine import describe
from bench.pipeline import PLAIN_CLIENTS, USAGE_PARTITIONS, plain_client
from bench.stages import weighted_percentile
from ledger.kafka import producer_config
from meterline.diskstore_files import SPARE_DIR
from meterline.services import BrokerProcess, embedded_broker, free_port, start_embedded_broker_with

SUBJECTS = 1_000


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _add_past_producers(meta: Path, count: int) -> None:
    """What ``count`` idempotent producers that have come and gone leave in the broker's cluster metadata: Tansu
    keeps every producer id's sequences there for good, and rewrites the whole object for every produced batch."""
    doc = orjson.loads(meta.read_bytes())
    rng = random.Random(3)
    for i in range(count):
        doc.setdefault("producers", {})[str(1_000_000 + i)] = {
            "sequences": {"0": {"produce.bench": {str(p): rng.randrange(10**6) for p in range(USAGE_PARTITIONS)}}}}
    meta.write_bytes(orjson.dumps(doc))


CLIENTS = (*PLAIN_CLIENTS, "meterline")


def client_config(client: str, bootstrap: str) -> dict[str, object]:
    """The producer settings of ``--client`` (module doc)."""
    if client == "meterline":
        os.environ["KAFKA_PRODUCER_IDEMPOTENCE"] = "false"  # what `meterline up` sets for the embedded broker
        return producer_config(bootstrap)
    return {"bootstrap.servers": bootstrap, **plain_client(client)}


def run(*, rate: float, seconds: float, warmup_s: float, window_s: float, spare_files: int | None,
        past_producers: int, client: str = "idempotent", fresh_files: int | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="broker-produce-") as home:
        port, store_port = free_port("127.0.0.1"), free_port("127.0.0.1")

        def engines() -> BrokerProcess:
            running = embedded_broker(host="127.0.0.1", port=port, store_port=store_port,
                                      log_path=Path(home, "broker.log"), storage_dir=Path(home, "broker"))
            assert running.store is not None
            if spare_files is not None:
                running.store.argv += ["--spare-files", str(spare_files)]
            if fresh_files is not None:
                running.store.argv += ["--fresh-files", str(fresh_files)]
            return start_embedded_broker_with(running)

        running = engines()
        try:
            admin = AdminClient({"bootstrap.servers": running.bootstrap})
            for future in admin.create_topics([NewTopic("produce.bench", num_partitions=USAGE_PARTITIONS,
                                                        replication_factor=1)]).values():
                future.result(15)
            if past_producers:  # written while the broker is down: it reads the object at start
                running.stop()
                meta = Path(home, "broker", "tansu", "clusters", "tansu_cluster", "meta.json")
                _add_past_producers(meta, past_producers)
                print(f"cluster metadata with {past_producers:,} past idempotent producers: "
                      f"{meta.stat().st_size:,} bytes")
                running = engines()
            config = client_config(client, running.bootstrap)
            print(f"producer: {client} (enable.idempotence={config.get('enable.idempotence')}, "
                  f"max.in.flight.requests.per.connection={config.get('max.in.flight.requests.per.connection', 'default')})")
            producer = Producer(config)
            acked: list[tuple[float, float]] = []  # (sent at, seconds to the acknowledgement)
            errors: list[str] = []

            def acknowledged(sent_at: float) -> Callable[[object, object], None]:
                def on_delivery(err: object, _msg: object) -> None:
                    if err is not None:
                        errors.append(str(err))
                    else:
                        acked.append((sent_at, time.monotonic() - sent_at))

                return on_delivery

            rng = random.Random(1)
            now_iso = datetime.now(UTC).isoformat()
            cpu_before = {name: _cpu_s(e.pid) for name, e in (("broker", running.broker), ("store", running.store))}
            started = time.monotonic()
            sent = 0
            while (elapsed := time.monotonic() - started) < seconds:
                due = min(int(elapsed * rate) + 1, int(seconds * rate))
                while sent < due:
                    subject = f"user-{rng.randrange(SUBJECTS)}"
                    value = orjson.dumps({"specversion": "1.0", "id": f"p-{sent}", "source": "bench",
                                          "type": "llm.tokens", "subject": subject, "time": now_iso,
                                          "data": {"tokens": rng.randint(1, 100)}})
                    producer.produce("produce.bench", value=value, key=subject.encode(),
                                     on_delivery=acknowledged(time.monotonic()))
                    sent += 1
                producer.poll(0.001)
            left = producer.flush(60)
            wall_s = time.monotonic() - started
            cpu = {name: (_cpu_s(e.pid) - cpu_before[name]) / wall_s
                   for name, e in (("broker", running.broker), ("store", running.store))}
            spare_dir = Path(home, "broker", SPARE_DIR)
            spares = len(os.listdir(spare_dir)) if spare_dir.exists() else 0
        finally:
            running.stop()
    steady = [(lat, 1) for at, lat in acked if at - started >= warmup_s]
    print(f"sent {sent:,} messages at {rate:,.0f}/s offered for {seconds:.0f} s; acknowledged {len(acked):,}, "
          f"errors {len(errors)}, unacknowledged {left}")
    print(f"send -> acknowledged after the first {warmup_s:.0f} s, ms: "
          + " / ".join(f"p{q:g} {1000 * weighted_percentile(steady, q / 100):.0f}" for q in (50, 90, 99))
          + f" / max {1000 * max((lat for lat, _ in steady), default=0):.0f}")
    windows: dict[int, list[tuple[float, int]]] = {}
    for at, lat in acked:
        windows.setdefault(int((at - started) // window_s), []).append((lat, 1))
    print(f"per {window_s:g} s of send time, p50/p99 ms: " + ", ".join(
        f"{int(w * window_s)}s {1000 * weighted_percentile(v, 0.5):.0f}/{1000 * weighted_percentile(v, 0.99):.0f}"
        for w, v in sorted(windows.items())))
    print(f"cpu, share of a core: broker (tansu) {cpu['broker']:.2f}, disk store {cpu['store']:.2f}; "
          f"spare files: at most {'the store default' if spare_files is None else spare_files}, {spares:,} at the end; "
          f"fresh files: {'the store default' if fresh_files is None else fresh_files}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000, help="messages per second offered")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=2.0, help="left out of the overall percentiles")
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--spare-files", type=int, default=None, help="the store's --spare-files (default: its own)")
    parser.add_argument("--fresh-files", type=int, default=None,
                        help="the store's --fresh-files (default: its own; 0: no refill thread)")
    parser.add_argument("--past-producers", type=int, default=0,
                        help="idempotent producers that came and went before the run (their entries in the broker's "
                             "cluster metadata, which it never drops)")
    parser.add_argument("--client", choices=CLIENTS, default="idempotent", help="the producer's settings (module doc)")
    args = parser.parse_args()
    print(describe())
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    run(rate=args.rate, seconds=args.seconds, warmup_s=args.warmup_s, window_s=args.window_s,
        spare_files=args.spare_files, past_producers=args.past_producers, client=args.client,
        fresh_files=args.fresh_files)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
