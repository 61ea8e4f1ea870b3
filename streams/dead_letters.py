"""The one place a dead letter (a message on ``usage.events.dlq.v1``) is built — pure, no I/O.

The worker produces exactly what :func:`dead_letter_message` returns, so tests and readers (analytics, the
API's dead-letter view) can use the real shape. Contract (streams/README.md, "Dead letters"):

- value: ``contracts.DeadLetter`` as JSON — reason, detail, source location, the refused bytes (text and
  base64), ``event`` (the refused JSON decoded, or null) and ``project`` (or null);
- headers: ``reason`` always; ``project`` when the refused bytes name one (so a consumer can route or filter
  by tenant without decoding the value).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

import orjson

from streams.contracts import DLQ_HEADER_PROJECT, DLQ_HEADER_REASON, dead_letter_project
from streams.metering import Rejection

__all__ = ["DeadLetterMessage", "dead_letter_message"]


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    value: bytes
    headers: list[tuple[str, bytes]]


def dead_letter_message(rejection: Rejection, *, source_topic: str, partition: int, offset: int,
                        now: datetime) -> DeadLetterMessage:
    """The DLQ message for one rejection of the event(s) at ``source_topic[partition]@offset``."""
    try:
        as_text: str | None = rejection.original.decode("utf-8")
    except UnicodeDecodeError:
        as_text = None
    try:
        event = orjson.loads(rejection.original) if rejection.original else None
    except orjson.JSONDecodeError:
        event = None
    project = dead_letter_project(event)
    envelope = {"reason": rejection.reason, "detail": rejection.detail, "source_topic": source_topic,
                "source_partition": partition, "source_offset": offset, "index": rejection.index,
                "project": project, "event": event, "original": as_text,
                "original_b64": base64.b64encode(rejection.original).decode(),
                "dead_lettered_at": now.isoformat()}
    headers = [(DLQ_HEADER_REASON, rejection.reason.encode())]
    if project is not None:
        headers.append((DLQ_HEADER_PROJECT, project.encode()))
    return DeadLetterMessage(orjson.dumps(envelope), headers)
