"""Group accepted events into Kafka messages: one partition per message, bounded size (pure).

Wire shape (streams/contracts.py): a message value is one event object, or a JSON array of events that all
map to the message's partition. Packing many events into one message amortizes the worker's per-message
cost; ``message_bytes_max`` keeps each message under the broker's message size limit, so a large batch for
one partition becomes several messages. A pack of one event is sent as the bare object keyed by its
subject, exactly like any keyed single-event producer would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from api.ingest.validate import Accepted
from streams.contracts import partition_for


@dataclass(frozen=True, slots=True)
class Message:
    partition: int
    key: bytes | None
    value: bytes
    events: int


def pack(accepted: Iterable[Accepted], *, partitions: int, message_bytes_max: int) -> list[Message]:
    groups: dict[int, list[Accepted]] = {}
    for item in accepted:
        groups.setdefault(partition_for(item.event["subject"], partitions), []).append(item)
    messages: list[Message] = []
    for partition in sorted(groups):
        chunk: list[bytes] = []
        subjects: set[str] = set()
        size = 2
        for item in groups[partition]:
            if chunk and size + len(item.payload) + 1 > message_bytes_max:
                messages.append(_message(partition, chunk, subjects))
                chunk, subjects, size = [], set(), 2
            chunk.append(item.payload)
            subjects.add(item.event["subject"])
            size += len(item.payload) + 1
        messages.append(_message(partition, chunk, subjects))
    return messages


def _message(partition: int, payloads: list[bytes], subjects: set[str]) -> Message:
    # a key only when it is honest: every event in the message has that subject
    key = next(iter(subjects)).encode("utf-8") if len(subjects) == 1 else None
    if len(payloads) == 1:
        return Message(partition, key, payloads[0], 1)
    return Message(partition, key, b"[" + b",".join(payloads) + b"]", len(payloads))
