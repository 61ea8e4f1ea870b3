"""The usage-event contract streams owns (CloudEvents 1.0 + project), its topic names, the partitioner and
the wire shape of messages on ``usage.events.v1``.

Dependency-light: pydantic + stdlib only (the api, the SDK and tests import it).

Wire shape of ``usage.events.v1`` (every producer: api ingest, SDK, tests, foreign Kafka clients):

- a message value is EITHER one event as a JSON object, OR a JSON array of events ("packed" message)
  that all map to the message's partition. Packing amortizes faust's per-message cost (~70 µs here).
- the partition is ``partition_for(subject, partitions)``: Kafka's murmur2 partitioner over the UTF-8
  subject, i.e. exactly what the Java client's default partitioner, aiokafka/faust's default partitioner
  and librdkafka's ``partitioner=murmur2_random`` (or ``murmur2``) do for a message KEYED by the subject.
  So a foreign producer either sets the partition with this function, or keys each single-event message
  by its subject with a murmur2 partitioner. (librdkafka's own default, ``consistent_random``, is CRC32
  and places subjects elsewhere — configure ``partitioner=murmur2_random``.)
- a misplaced event (wrong partitioner) is still charged exactly once: counters are kept per source
  partition and the ledger merges partitions before pricing. What is lost for a misplaced event is
  dedupe across partitions (a resend that lands in another partition is not recognised) and it is
  counted in the worker's ``misplaced`` metric.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = [
    "DLQ_HEADER_PROJECT",
    "DLQ_HEADER_REASON",
    "TOPIC_USAGE_DLQ",
    "TOPIC_USAGE_EVENTS",
    "DeadLetter",
    "UsageEvent",
    "dead_letter_project",
    "murmur2",
    "pack_events",
    "partition_for",
]

TOPIC_USAGE_EVENTS = "usage.events.v1"
TOPIC_USAGE_DLQ = "usage.events.dlq.v1"
#: headers of every dead letter: its reason code, and its project when the refused bytes name one
DLQ_HEADER_REASON = "reason"
DLQ_HEADER_PROJECT = "project"


class UsageEvent(BaseModel):
    """One usage event as producers send it: CloudEvents 1.0 attributes plus the owning project.

    Identity for deduplication is (project, source, id)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: str = "1.0"
    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=256)
    subject: str = Field(min_length=1, max_length=256)
    time: AwareDatetime | None = None
    project: str = Field(min_length=1, max_length=64)
    data: dict[str, Any] | None = None


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2) as an unsigned 32-bit int."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    extra = length % 4
    if extra >= 3:
        h ^= data[whole + 2] << 16
    if extra >= 2:
        h ^= data[whole + 1] << 8
    if extra >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


@functools.lru_cache(maxsize=65_536)
def partition_for(subject: str, partitions: int) -> int:
    """The partition of ``usage.events.v1`` every event of ``subject`` goes to.

    Pure and stable: Kafka's default (murmur2, positive, modulo) partitioner over the UTF-8 subject, so a
    message keyed by the subject lands in the same partition with any murmur2-partitioning client."""
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return (murmur2(subject.encode("utf-8")) & 0x7FFFFFFF) % partitions


def pack_events(events: list[dict[str, Any]], partitions: int) -> dict[int, list[dict[str, Any]]]:
    """Group events (dicts with a ``subject``) by their partition, keeping their order within each."""
    out: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        out.setdefault(partition_for(str(event["subject"]), partitions), []).append(event)
    return out


class DeadLetter(BaseModel):
    """The value of a message on ``usage.events.dlq.v1``: why an event was refused, and the event itself.

    ``original_b64`` is the exact bytes refused: the whole message for a message-level problem
    (``index`` null), or the JSON of the one bad element of a packed message (``index`` = its position).
    ``original`` is the same bytes as text (when UTF-8) and ``event`` the refused JSON decoded (absent when it
    is not JSON), so a reader never parses a string inside the envelope. ``project`` is the project the refused
    bytes name (also sent as the ``project`` header); null when they name none (unparseable input).
    ``source_partition``/``source_offset`` locate it in ``usage.events.v1``; a worker crash can re-emit the
    same dead letter, so readers de-duplicate on (source_partition, source_offset, index).

    Messages written before ``project``/``event`` existed lack both (and the header): readers derive the
    project from ``original`` (analytics/rows.py does)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    reason: str = Field(description="stable code, see streams.metering.REASONS")
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    index: int | None = None
    original: str | None = Field(default=None, description="the refused bytes as text, when valid UTF-8")
    original_b64: str
    dead_lettered_at: AwareDatetime
    project: str | None = Field(default=None, description="the project the refused event names, if any")
    event: Any = Field(default=None, description="the refused JSON, decoded; null when it is not JSON")


def dead_letter_project(refused: Any) -> str | None:
    """The project refused JSON names: an event's ``project``, or the one project every event of a packed
    array names (a packed message mixing projects, or naming none, has no single project)."""
    if isinstance(refused, dict):
        project = refused.get("project")
        return project if isinstance(project, str) and project else None
    if isinstance(refused, list) and refused:
        projects = {dead_letter_project(item) for item in refused}
        if len(projects) == 1:
            return projects.pop()
    return None
