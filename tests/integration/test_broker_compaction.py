"""The disk store's compaction under the real embedded broker: thousands of small batches become a few objects,
and every reader — from the start, from a committed offset inside a merged run, one reading while runs are merged,
and one after a broker restart — gets every record once, in order, exactly as produced.

Why it exists: Tansu lists a partition's whole records/ folder on every fetch, so each retained object costs every
fetch (docs/architecture.md "Durable topics"); a plain client sending one event per message makes thousands."""

from __future__ import annotations

import glob
import hashlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from meterline.diskstore import partition_log_end
from meterline.services import BrokerProcess, free_port, start_embedded_broker

pytestmark = pytest.mark.integration

TOPIC = "compaction"
PER_PARTITION = 1_500
TS0 = 1_700_000_000_000


def _start(storage: Path) -> BrokerProcess:
    port = free_port("127.0.0.1")
    return start_embedded_broker(host="127.0.0.1", port=port, log_path=storage.parent / "broker.log",
                                 storage_dir=storage, merge_after_s=1.0, merge_big_after_s=2.0,
                                 merge_big_bytes_max=2_500_000)


@pytest.fixture
def storage() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="meterline-compaction-"))
    yield root / "broker"


def _objects(storage: Path) -> int:
    return len(glob.glob(str(storage / f"tansu/clusters/*/topics/{TOPIC}/partitions/*/records/*.batch")))


def _expected(partition: int, offset: int) -> tuple[bytes, bytes, list[tuple[str, bytes]], int]:
    """The record at an offset. Values are 1 KiB that lz4 cannot shrink, so a partition's 1,500 records make runs
    the store merges (half of its 1 MiB run size, or 1,000 objects, before a run at the young end is merged)."""
    n = partition * PER_PARTITION + offset
    return b"k%d" % (n % 13), hashlib.shake_256(b"%d" % n).digest(1024), [("n", b"%d" % n)], TS0 + n * 7


def _read(bootstrap: str, starts: dict[int, int], *, group: str, resume: bool = False, slow: bool = False,
          timeout_s: float = 90) -> dict[int, list[int]]:
    """Offsets read per partition until each reached its end, checking each record's key, value, headers and
    timestamp on the way. ``resume``: subscribe and start from the group's committed offsets (``starts`` then
    says where they are, for knowing when to stop)."""
    config = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
              "auto.offset.reset": "earliest", "fetch.wait.max.ms": 50, "fetch.queue.backoff.ms": 10,
              "session.timeout.ms": 6000}
    if slow:  # fetch a few KiB at a time, so this reader is still in the old runs while they are merged
        config.update({"max.partition.fetch.bytes": 2048, "queued.min.messages": 1, "queued.max.messages.kbytes": 1})
    consumer = Consumer(config)
    if resume:
        consumer.subscribe([TOPIC])
    else:
        consumer.assign([TopicPartition(TOPIC, p, o) for p, o in starts.items()])
    got: dict[int, list[int]] = {0: [], 1: []}
    want = sum(PER_PARTITION - o for o in starts.values())
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and sum(map(len, got.values())) < want:
            for m in consumer.consume(20 if slow else 1000, 0.5):
                assert m.error() is None, m.error()
                key, value, headers, timestamp = _expected(m.partition(), m.offset())
                assert (m.key(), m.value(), m.headers(), m.timestamp()[1]) == (key, value, headers, timestamp)
                got[m.partition()].append(m.offset())
            if slow:
                time.sleep(0.02)
    finally:
        consumer.close()
    return got


def test_compacted_partitions_read_back_every_record_once_from_anywhere(storage: Path) -> None:
    broker = _start(storage)
    try:
        bootstrap = broker.bootstrap
        admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until its future resolves
        admin.create_topics([NewTopic(TOPIC, 2, 1)])[TOPIC].result(30)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all", "enable.idempotence": True,
                             "compression.type": "lz4"})

        def produce() -> None:
            for offset in range(PER_PARTITION):
                for partition in (0, 1):
                    key, value, headers, timestamp = _expected(partition, offset)
                    producer.produce(TOPIC, key=key, value=value, headers=headers, timestamp=timestamp,
                                     partition=partition)
                if offset % 5 == 4:
                    producer.flush(30)  # small batches, one object each: what a plain client's traffic looks like
            producer.flush(30)

        writer = threading.Thread(target=produce)
        writer.start()
        time.sleep(1.0)
        slow: dict[str, dict[int, list[int]]] = {}
        reader = threading.Thread(target=lambda: slow.setdefault("got", _read(bootstrap, {0: 0, 1: 0}, group="slow",
                                                                               slow=True)))
        reader.start()
        writer.join()
        written = _objects(storage)  # at least one object per flush per partition, 600 in all, less any merged

        committer = Consumer({"bootstrap.servers": bootstrap, "group.id": "resume", "enable.auto.commit": False})
        committer.commit(offsets=[TopicPartition(TOPIC, 0, 777), TopicPartition(TOPIC, 1, 3)], asynchronous=False)
        committer.close()

        # the first tier makes ~1 MiB objects (2-3 a partition with the newest), the second merges those again
        # (up to 2.5 MB here): one merged object and the newest batch per partition
        deadline = time.monotonic() + 30
        while _objects(storage) > 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _objects(storage) <= 4, f"{written} objects, {_objects(storage)} after 30 s of compaction"

        every = {p: list(range(PER_PARTITION)) for p in (0, 1)}
        assert _read(bootstrap, {0: 0, 1: 0}, group="from-start") == every
        assert _read(bootstrap, {0: 777, 1: 3}, group="resume", resume=True) == {0: list(range(777, PER_PARTITION)),
                                                          1: list(range(3, PER_PARTITION))}
        assert _read(bootstrap, {0: 1_001, 1: 1_499}, group="inside") == {0: list(range(1_001, PER_PARTITION)),
                                                                         1: [1_499]}
        reader.join(120)
        assert slow.get("got") == every  # read while its runs were merged under it

        # the broker's own end marks, untouched by compaction (its ListOffsets answer is wrong anyway, DESIGN §5)
        assert [partition_log_end(storage, TOPIC, p) for p in (0, 1)] == [PER_PARTITION, PER_PARTITION]
    finally:
        broker.stop()

    broker = _start(storage)  # the merged objects are the partition now: a new broker life reads them the same
    try:
        assert _read(broker.bootstrap, {0: 0, 1: 0}, group="after-restart") == \
               {p: list(range(PER_PARTITION)) for p in (0, 1)}
    finally:
        broker.stop()
