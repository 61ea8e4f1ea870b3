"""Where an event's latency goes: the event→balance time of bench.pipeline cut at the points the bench can see
from outside the processes, without instrumenting them.

For every usage message the bench knows when it was sent, when the broker acknowledged it (the producer's
delivery report) and when the ledger's applied mark passed its offset (``AppliedWatcher``). ``CheckpointWatcher``
reads the charges topic beside the ledger and notes, per source partition, each checkpoint's ``as_of_offset``, its
Kafka timestamp (CreateTime: when streams produced it) and when this reader got it. The first checkpoint that
covers a message's offset is the one that carried it, so:

- **produce → acked**: the producer's batching and the broker's append (the disk store's PUTs);
- **acked → checkpoint**: streams — the fetch hop, the wait for a batch, metering, the wait for the flush;
- **checkpoint → readable**: the charges hop as a consumer sees it (the broker's append and fetch wait);
- **checkpoint → applied**: the ledger — its fetch hop, the wait for the round in progress, apply and commit
  (plus up to 20 ms of the applied-mark poll).

The stages' percentiles are each over every event, so they do not add up to the end-to-end percentile.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

__all__ = ["Applied", "CheckpointSeen", "CheckpointWatcher", "StageLatencies", "stage_latencies", "weighted_percentile"]

# source_topic, partition, as_of_offset are the model's first fields, so they are in the first bytes of the JSON:
# a checkpoint of 100,000 counters need not be parsed to be placed
_HEAD = re.compile(rb'"partition":\s*(\d+),\s*"as_of_offset":\s*(\d+)')


class CheckpointSeen(NamedTuple):
    as_of_offset: int
    produced_at: float  # its CreateTime, s since the epoch
    read_at: float  # when this reader got it


class Applied(NamedTuple):
    """One usage message as the bench saw it (times in s since the epoch)."""

    partition: int
    offset: int
    sent_at: float
    acked_at: float
    applied_at: float
    events: int


class CheckpointWatcher:
    """Reads a charges topic from its current end (no consumer group) and keeps every checkpoint's head."""

    def __init__(self, bootstrap: str, topic: str, *, partitions: int) -> None:
        self.seen: dict[int, list[CheckpointSeen]] = defaultdict(list)
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}.stage-watcher",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 50,
                                   "fetch.queue.backoff.ms": 10})
        self._consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in range(partitions)])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)

    def __enter__(self) -> CheckpointWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(num_messages=500, timeout=0.1):
                value = message.value()
                if message.error() is not None or value is None:
                    continue
                read_at = time.time()
                head = _HEAD.search(value[:512])
                if head is None:
                    continue
                self.seen[int(head[1])].append(
                    CheckpointSeen(int(head[2]), message.timestamp()[1] / 1000, read_at))


class Stage(NamedTuple):
    name: str
    p50_s: float
    p99_s: float
    events: int


class StageLatencies(NamedTuple):
    stages: list[Stage]
    uncovered: int  # events whose checkpoint the watcher did not see

    def line(self) -> str:
        parts = [f"{s.name} {1000 * s.p50_s:.0f}/{1000 * s.p99_s:.0f}" for s in self.stages]
        tail = f" ({self.uncovered:,} events without a seen checkpoint)" if self.uncovered else ""
        return "latency by stage, p50/p99 ms: " + ", ".join(parts) + tail


def stage_latencies(applied: Iterable[Applied], checkpoints: dict[int, list[CheckpointSeen]]) -> StageLatencies:
    """Pure: each message's stages against the first checkpoint of its partition that covers its offset (the
    earliest produced among those with ``as_of_offset >= offset``: a fenced owner's late copy does not count)."""
    covering = {p: _earliest_covering(seen) for p, seen in checkpoints.items()}
    samples: dict[str, list[tuple[float, int]]] = defaultdict(list)
    uncovered = 0
    for m in applied:
        samples["produce→acked"].append((m.acked_at - m.sent_at, m.events))
        found = covering.get(m.partition)
        checkpoint = found(m.offset) if found is not None else None
        if checkpoint is None:
            uncovered += m.events
            continue
        samples["acked→checkpoint"].append((checkpoint.produced_at - m.acked_at, m.events))
        samples["checkpoint→readable"].append((checkpoint.read_at - checkpoint.produced_at, m.events))
        samples["checkpoint→applied"].append((m.applied_at - checkpoint.produced_at, m.events))
    order = ("produce→acked", "acked→checkpoint", "checkpoint→readable", "checkpoint→applied")
    return StageLatencies([Stage(name, weighted_percentile(samples[name], 0.50), weighted_percentile(samples[name], 0.99),
                                 sum(n for _, n in samples[name])) for name in order if samples[name]], uncovered)


def _earliest_covering(seen: Sequence[CheckpointSeen]) -> Callable[[int], CheckpointSeen | None]:
    """A lookup offset → the earliest-produced checkpoint with as_of ≥ offset (suffix minimum over as_of order)."""
    ordered = sorted(seen)
    best: list[CheckpointSeen] = []  # after the reverse, best[i] = the earliest produced of ordered[i:]
    for checkpoint in reversed(ordered):
        best.append(checkpoint if not best or checkpoint.produced_at <= best[-1].produced_at else best[-1])
    best.reverse()
    offsets = [c.as_of_offset for c in ordered]

    def lookup(offset: int) -> CheckpointSeen | None:
        i = bisect.bisect_left(offsets, offset)
        return best[i] if i < len(best) else None

    return lookup


def weighted_percentile(samples: list[tuple[float, int]], q: float) -> float:
    """The ``q`` quantile of (value, weight) samples: each value counts ``weight`` times (events per message)."""
    ordered = sorted(samples)
    target = q * sum(n for _, n in ordered)
    running = 0
    for value, n in ordered:
        running += n
        if running >= target:
            return value
    return float("nan")
