"""Dead-letter redrive's pure part (streams/redrive.py): envelopes → letters with their project and identity,
selection by project/reason/id/time (each letter once), and the usage message that carries the event again."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import orjson

from streams.contracts import partition_for
from streams.redrive import RedriveSelection, by_reason, parse_letter, redrive_message, select

AT = datetime(2026, 12, 3, 12, tzinfo=UTC)


def _envelope(original: bytes, *, reason: str = "unknown_meter", offset: int = 7, index: int | None = None,
              at: datetime = AT) -> bytes:
    return orjson.dumps({"reason": reason, "detail": "d", "source_topic": "usage.events.v1", "source_partition": 2,
                         "source_offset": offset, "index": index, "original": original.decode(errors="replace"),
                         "original_b64": base64.b64encode(original).decode(), "dead_lettered_at": at.isoformat()})


def _event(i: int, project: str = "p1") -> dict[str, object]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "app", "type": "llm.images", "subject": "alice",
            "project": project, "data": {"tokens": i}}


def test_letters_carry_their_project_identity_and_a_stable_id() -> None:
    letter = parse_letter(_envelope(orjson.dumps(_event(1)), index=3))
    assert letter is not None and (letter.id, letter.project_id, letter.identity) == ("2:7:3", "p1", ("app", "e1"))
    broken = parse_letter(_envelope(b'{"id": "x", ', reason="bad_json"))
    assert broken is not None and broken.identity is None and broken.project_id is None and broken.id == "2:7:-"
    assert parse_letter(b"not an envelope") is None and parse_letter(None) is None


def test_selection_by_project_reason_id_and_time_takes_each_letter_once() -> None:
    letters = [parse_letter(v) for v in (
        _envelope(orjson.dumps(_event(1)), offset=1),
        _envelope(orjson.dumps(_event(1)), offset=1),  # re-emitted by a crashed worker: the same letter
        _envelope(orjson.dumps(_event(2)), offset=2, reason="bad_value", at=AT + timedelta(minutes=5)),
        _envelope(orjson.dumps(_event(3, project="p2")), offset=3))]
    assert all(letters)
    mine = select(letters, RedriveSelection("p1"))  # type: ignore[arg-type]
    assert [x.id for x in mine] == ["2:1:-", "2:2:-"] and by_reason(mine) == {"bad_value": 1, "unknown_meter": 1}
    assert [x.id for x in select(letters, RedriveSelection("p1", reasons=frozenset({"bad_value"})))] == ["2:2:-"]  # type: ignore[arg-type]
    assert [x.id for x in select(letters, RedriveSelection("p1", ids=frozenset({"2:1:-"})))] == ["2:1:-"]  # type: ignore[arg-type]
    assert [x.id for x in select(letters, RedriveSelection("p1", since=AT + timedelta(minutes=1)))] == ["2:2:-"]  # type: ignore[arg-type]
    assert select(letters, RedriveSelection("p2", until=AT)) == []  # type: ignore[arg-type]


def test_a_redriven_event_keeps_its_identity_in_its_subjects_partition() -> None:
    letter = parse_letter(_envelope(orjson.dumps(_event(4)), index=0))
    assert letter is not None
    partition, key, value = redrive_message(letter, 8)
    assert (partition, key) == (partition_for("alice", 8), b"alice") and orjson.loads(value) == _event(4)
