"""Dead-letter redrive, the pure part: read DLQ envelopes (``streams.contracts.DeadLetter``), select some, and
turn each back into a usage message for ``usage.events.v1``.

Why a redriven event is charged at most once:
- it keeps its identity (project, source, id), so the workers' dedupe (streams/metering.py step 3, seeded from
  the ledger's dedupe keys) counts a second copy within the horizon as a duplicate — a rejected event was never
  remembered as seen, so the FIRST redrive is counted;
- the caller records every redriven identity (api_0012 ``dead_letter_redrives``, UNIQUE per project and
  identity) before producing, so a second redrive of it — even after the dedupe horizon — produces nothing.
Only dead letters that hold one JSON event with an identity can be redriven; a message-level rejection
(``bad_json``, an empty or oversized pack) has none and is reported as such."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from streams.contracts import DeadLetter, partition_for

__all__ = ["Letter", "RedriveSelection", "parse_letter", "redrive_message", "select"]


@dataclass(frozen=True)
class Letter:
    """One dead letter as the redrive sees it."""

    id: str  # "{source_partition}:{source_offset}:{index or -}" (a worker crash may re-emit it: dedupe on it)
    reason: str
    detail: str
    dead_lettered_at: datetime
    event: dict[str, Any] | None  # the refused event, when it is one JSON object
    project_id: str | None
    #: (source, id) of the event, None when it has none (then it cannot be redriven)
    identity: tuple[str, str] | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail,
                "dead_lettered_at": self.dead_lettered_at.isoformat(), "project_id": self.project_id,
                "event_source": self.identity[0] if self.identity else None,
                "event_id": self.identity[1] if self.identity else None, "event": self.event}


def parse_letter(value: bytes | None) -> Letter | None:
    """None for a DLQ message that is not a dead-letter envelope (nothing to redrive)."""
    if not value:
        return None
    try:
        envelope = DeadLetter.model_validate_json(value)
    except ValidationError:
        return None
    raw = base64.b64decode(envelope.original_b64)
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = None
    project = event.get("project") if event else None
    source, event_id = (event.get("source"), event.get("id")) if event else (None, None)
    identity = (source, event_id) if isinstance(source, str) and isinstance(event_id, str) and source and event_id \
        else None
    index = "-" if envelope.index is None else str(envelope.index)
    return Letter(f"{envelope.source_partition}:{envelope.source_offset}:{index}", envelope.reason, envelope.detail,
                  envelope.dead_lettered_at, event, project if isinstance(project, str) else None, identity)


@dataclass(frozen=True)
class RedriveSelection:
    project_id: str
    reasons: frozenset[str] | None = None
    ids: frozenset[str] | None = None
    since: datetime | None = None  # on dead_lettered_at, inclusive
    until: datetime | None = None  # exclusive


def select(letters: Iterable[Letter], selection: RedriveSelection) -> list[Letter]:
    """The project's letters that match every given criterion, once each (first copy), oldest first."""
    seen: set[str] = set()
    out: list[Letter] = []
    for letter in letters:
        if letter.project_id != selection.project_id or letter.id in seen:
            continue
        if selection.reasons is not None and letter.reason not in selection.reasons:
            continue
        if selection.ids is not None and letter.id not in selection.ids:
            continue
        if selection.since is not None and letter.dead_lettered_at < selection.since:
            continue
        if selection.until is not None and letter.dead_lettered_at >= selection.until:
            continue
        seen.add(letter.id)
        out.append(letter)
    return sorted(out, key=lambda letter: letter.dead_lettered_at)


def redrive_message(letter: Letter, partitions: int) -> tuple[int, bytes, bytes]:
    """(partition, key, value) of the usage message that carries ``letter``'s event again: one event, keyed by
    its subject and in the subject's partition (the partitioning contract), identity unchanged."""
    assert letter.event is not None and letter.identity is not None
    subject = letter.event.get("subject")
    subject_text = subject if isinstance(subject, str) else ""
    return partition_for(subject_text, partitions), subject_text.encode(), orjson.dumps(letter.event)


def by_reason(letters: Sequence[Letter]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for letter in letters:
        counts[letter.reason] = counts.get(letter.reason, 0) + 1
    return dict(sorted(counts.items()))
