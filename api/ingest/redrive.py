"""Dead-letter redrive, the I/O part (the pure part is streams/redrive.py).

``read_letters`` reads usage.events.dlq.v1 from its first offset with an unsubscribed consumer (no group
commits). The broker's high watermark is not trusted (DESIGN §5): reading stops after ``idle_s`` without a
message or at the deadline.

``redrive`` — each selected event at most once:
1. in ONE PostgreSQL transaction, insert a ``dead_letter_redrives`` row per dead letter (one per event identity
   in this request) with ``ON CONFLICT DO NOTHING RETURNING``: only letters never redriven come back;
2. produce exactly those events to usage.events.v1 (idempotent producer, acks=all) and wait for every
   acknowledgement; any failure raises and rolls the rows back (nothing was recorded, retry later);
3. commit. A crash between the broker's acknowledgement and the commit leaves events in the topic without a
   row: a retry produces them again and the workers' dedupe by (project, source, id) counts them once
   (within its horizon — the one window left, documented in api/README.md).
The audit row travels in the same transaction."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from api.ingest.producer import BrokerUnavailable
from ledger.sqlrows import rows_json
from streams.redrive import Letter, parse_letter, redrive_message

__all__ = ["RedriveResult", "read_letters", "redrive", "redriven_letters"]


def read_letters(bootstrap: str, topic: str, *, timeout_s: float = 30.0, idle_s: float = 1.5) -> list[Letter]:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from ledger.kafka import make_consumer, require_topics

    partitions = require_topics(bootstrap, [topic])[topic]
    consumer = make_consumer(bootstrap, f"meterline-dlq-reader-{uuid.uuid4().hex}", **{"enable.auto.commit": False})
    letters: list[Letter] = []
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        deadline = time.monotonic() + timeout_s
        last_message = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_message < idle_s:
            batch = consumer.consume(num_messages=1_000, timeout=0.2)
            for msg in batch:
                if msg.error() is not None:
                    continue
                last_message = time.monotonic()
                letter = parse_letter(msg.value())
                if letter is not None:
                    letters.append(letter)
    finally:
        consumer.close()
    return letters


def redriven_letters(conn: Connection, project_id: str) -> dict[tuple[str, str, str], str]:
    """(dead-letter id, event source, event id) -> redrive id, for the project."""
    rows = conn.execute(text("SELECT dead_letter_id, event_source, event_id, redrive_id FROM dead_letter_redrives "
                             "WHERE project_id = :p"), {"p": project_id})
    return {(r.dead_letter_id, r.event_source, r.event_id): r.redrive_id for r in rows}


@dataclass
class RedriveResult:
    redrive_id: str
    selected: int = 0
    redriven: list[str] = field(default_factory=list)  # dead-letter ids produced again now
    already_redriven: list[str] = field(default_factory=list)  # their event was redriven before (or twice here)
    not_redrivable: list[str] = field(default_factory=list)  # no event with an identity (e.g. bad_json)

    def to_json(self) -> dict[str, Any]:
        return {"redrive_id": self.redrive_id, "selected": self.selected, "redriven": self.redriven,
                "already_redriven": self.already_redriven, "not_redrivable": self.not_redrivable}


_RECORD = text("""
    INSERT INTO dead_letter_redrives (project_id, event_source, event_id, dead_letter_id, reason, redrive_id,
                                      redriven_by)
    SELECT :project, r.source, r.id, r.letter, r.reason, :redrive, :actor
    FROM json_to_recordset(CAST(:rows AS json)) AS r(source text, id text, letter text, reason text)
    ON CONFLICT DO NOTHING
    RETURNING dead_letter_id
""")


def redrive(engine: Engine, *, bootstrap: str, usage_topic: str, partitions: int, project_id: str,
            letters: Sequence[Letter], actor: str | None, timeout_s: float = 30.0,
            audit: Any = None) -> RedriveResult:
    """Redrive ``letters`` (already selected, all of ``project_id``); see the module doc for the guarantee.
    ``audit(conn, result)`` runs in the same transaction when given."""
    from ledger.kafka import make_producer

    result = RedriveResult(redrive_id=f"rd_{uuid.uuid4().hex[:20]}", selected=len(letters))
    first: dict[tuple[str, str], Letter] = {}
    for letter in letters:
        if letter.identity is None or letter.event is None:
            result.not_redrivable.append(letter.id)
        elif letter.identity in first:
            result.already_redriven.append(letter.id)
        else:
            first[letter.identity] = letter
    with engine.begin() as conn:
        inserted = {r.dead_letter_id for r in conn.execute(_RECORD, {
            "project": project_id, "redrive": result.redrive_id, "actor": actor,
            "rows": rows_json({"source": s, "id": i, "letter": letter.id, "reason": letter.reason}
                              for (s, i), letter in first.items())})} if first else set()
        fresh = [letter for letter in first.values() if letter.id in inserted]
        result.already_redriven.extend(letter.id for letter in first.values() if letter.id not in inserted)
        if fresh:
            _produce(make_producer(bootstrap), usage_topic, partitions, fresh, timeout_s)
        result.redriven = [letter.id for letter in fresh]
        if audit is not None:
            audit(conn, result)
    return result


def _produce(producer: Any, topic: str, partitions: int, letters: Sequence[Letter], timeout_s: float) -> None:
    errors: list[str] = []
    acked = 0

    def delivered(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is not None:
            errors.append(str(err))
        else:
            acked += 1

    for letter in letters:
        partition, key, value = redrive_message(letter, partitions)
        producer.produce(topic, value=value, key=key, partition=partition, on_delivery=delivered)
    left = producer.flush(timeout_s)
    if left or errors or acked != len(letters):
        raise BrokerUnavailable(f"the broker did not acknowledge every redriven event ({acked}/{len(letters)}): "
                                f"{'; '.join(errors[:3]) or f'{left} still queued'}; nothing was recorded, retry",
                                retry_after_s=5)
