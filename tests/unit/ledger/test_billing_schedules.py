"""Billing-rule schedules: what users ask for becomes a UTC cron expression, and due times follow it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ledger.billing import cron_expression, next_due
from ledger.errors import InvalidRequest

T = datetime(2026, 12, 1, 10, 30, tzinfo=UTC)  # a Tuesday


@pytest.mark.parametrize(("schedule", "cron"), [
    ({"kind": "daily"}, "0 0 * * *"),
    ({"kind": "daily", "hour": 9, "minute": 5}, "5 9 * * *"),
    ({"kind": "weekly", "days": ["thu", "mon", "Monday"]}, "0 0 * * 1,4"),
    ({"kind": "monthly", "days": [15, 1, 15]}, "0 0 1,15 * *"),
    ({"kind": "monthly", "days": ["last"], "hour": 23, "minute": 59}, "59 23 L * *"),
    ({"kind": "cron", "expression": " */15 * * * * "}, "*/15 * * * *"),
])
def test_presets_become_cron_expressions(schedule: dict[str, object], cron: str) -> None:
    assert cron_expression(schedule) == cron


@pytest.mark.parametrize("schedule", [
    {"kind": "hourly"}, {"kind": "weekly", "days": []}, {"kind": "weekly", "days": ["funday"]},
    {"kind": "monthly", "days": [31]}, {"kind": "monthly", "days": [1, "last"]}, {"kind": "daily", "hour": 24},
    {"kind": "cron", "expression": "* * * *"}, {"kind": "cron", "expression": "0 0 * * * *"},
    {"kind": "cron", "expression": "nonsense here is five"},
])
def test_bad_schedules_are_refused_with_a_reason(schedule: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        cron_expression(schedule)


def test_due_times_are_strictly_after_and_utc() -> None:
    assert next_due("0 0 * * *", T) == datetime(2026, 12, 2, tzinfo=UTC)
    assert next_due("0 0 * * *", datetime(2026, 12, 2, tzinfo=UTC)) == datetime(2026, 12, 3, tzinfo=UTC)
    assert next_due("0 0 * * 1,4", T) == datetime(2026, 12, 3, tzinfo=UTC)  # Thursday
    assert next_due("0 0 L * *", T) == datetime(2026, 12, 31, tzinfo=UTC)
    assert next_due("0 0 L * *", datetime(2027, 2, 1, tzinfo=UTC)) == datetime(2027, 2, 28, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    # 01:00 at +02:00 is 23:00 UTC the day before: the next UTC midnight is the same calendar day
    assert next_due("0 0 * * *", datetime(2026, 12, 2, 1, 0, tzinfo=plus_two)) == datetime(2026, 12, 2, tzinfo=UTC)
    with pytest.raises(InvalidRequest):
        next_due("0 0 * * *", datetime(2026, 12, 1))  # naive: refused
