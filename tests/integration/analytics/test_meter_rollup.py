"""The hourly per-meter rollup (analytics/meter_rollup.py) gives exactly the raw-row figures.

Real messages on the usage topic, stored by the real sink into the real ClickHouse engine; the same service
is asked with the rollup on and off (off = every figure computed from the raw rows) and both must agree — for
every aggregation kind, over windows whose edges cut hours, across a meter version that changes mid-hour and
a price version that changes mid-hour. Then: the rollup is really read (a corrupted rollup changes the answer;
the stats say so), and an event arriving late into a filled hour makes that hour refill (never a stale read).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics_testkit import usage_event

from analytics.client import ClientPool
from analytics.meter_units import MeterSpec, MeterVersion
from analytics.queries import Analytics, Window
from streams.contracts import TOPIC_USAGE_EVENTS

pytestmark = pytest.mark.integration

START = datetime(2026, 10, 12, 6, tzinfo=UTC)
CHANGE = START + timedelta(days=1, hours=3, minutes=17, seconds=3, milliseconds=500)  # mid-hour
PRICE_CHANGE = START + timedelta(days=2, minutes=41, milliseconds=250)  # mid-hour
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
AGGREGATIONS = ("SUM", "COUNT", "MAX", "LATEST", "UNIQUE_COUNT")


def _versioned(aggregation: str) -> MeterSpec:
    """v1: $.units of every tokens event; v2 (from CHANGE, mid-hour): $.alt of the 'large' ones only."""
    value = None if aggregation == "COUNT" else "$.units"
    return MeterSpec(
        id=f"mtr_{aggregation.lower()}", slug=aggregation.lower(), group_by=("$.model",), event_type="tokens",
        price_versions=(("pv_1", EPOCH), ("pv_2", PRICE_CHANGE)),
        versions=(MeterVersion("tokens", aggregation, value, (), EPOCH, CHANGE),
                  MeterVersion("tokens", aggregation, None if value is None else "$.alt",
                               ({"property": "$.model", "in": ["large"]},), CHANGE, None)))


METERS = [_versioned(a) for a in AGGREGATIONS]


def _value(rng: random.Random) -> Any:
    # valid numbers and numeric strings, and what a meter refuses (streams' bad_value): text, negative, null
    return rng.choice([rng.randint(0, 500), str(Decimal(rng.randint(1, 4000)) / 8), "lots", -3, None,
                       rng.randint(1, 9) * 1000])


def _events(rng: random.Random, count: int, project: str = "prj_r") -> list[dict[str, Any]]:
    events = []
    for _ in range(count):
        # distinct millisecond times: LATEST has one answer
        moment = START + timedelta(milliseconds=rng.randrange(0, 3 * 86_400_000))
        events.append(usage_event(project=project, subject=f"user{rng.randint(1, 5)}", units=_value(rng),
                                  alt=_value(rng), time_=moment, model=rng.choice(["small", "large", "xl"])))
    times = [e["time"] for e in events]
    assert len(set(times)) == len(times)
    return events


def _send(producer: Any, topic: str, events: list[dict[str, Any]]) -> int:
    messages = 0
    for chunk in range(0, len(events), 9):  # packed messages, as the api and the SDK send them
        producer.send(topic, events[chunk:chunk + 9], key=str(chunk))
        messages += 1
    producer.flush()
    return messages


@pytest.fixture
def services(analytics_settings: Any) -> Any:
    pool = ClientPool(analytics_settings.clickhouse_url, size=2)
    rollup = Analytics(analytics_settings, pool)
    raw = Analytics(analytics_settings.model_copy(update={"meter_rollup": False}), pool)
    yield rollup, raw
    pool.close()


def _views(service: Analytics, win: Window, meters: list[MeterSpec], *, every: bool) -> list[Any]:
    """What the dashboard asks (totals, series by meter) and the groupings (a group-by key, the price
    version) — for every meter when ``every``, else for two (the run stays short)."""
    out: list[Any] = [service.usage_totals(project_id="prj_r", win=win, meters=meters)]
    for granularity in ("hour", "day", "month") if every else ("hour", "day"):
        out.append(service.usage(project_id="prj_r", win=win, granularity=granularity, meters=meters))
    for n, meter in enumerate(meters):
        for group_by in ("$.model", "price_version"):
            if every or (n, group_by) in ((0, "price_version"), (3, "$.model")):
                out.append(service.usage(project_id="prj_r", win=win, granularity="hour", meters=[meter],
                                         group_by=group_by))
    return out


def test_rollup_equals_raw_rows_for_every_aggregation_edges_and_versions(topics, producer, ch, run_sink, services):
    rollup, raw = services
    rng = random.Random(16)
    events = _events(rng, 600)
    topic = topics.name(TOPIC_USAGE_EVENTS)
    messages = _send(producer, topic, events + _events(rng, 20, project="prj_other"))
    sink = run_sink()
    sink.wait_messages({topic: messages})

    windows = [Window(START - timedelta(hours=5), START + timedelta(days=4)),  # everything
               # edges cut hours (totals keep them exact; series widen to whole buckets as before)
               Window(START + timedelta(hours=2, minutes=37, seconds=12, milliseconds=345),
                      START + timedelta(days=2, hours=5, minutes=3, milliseconds=1)),
               # entirely inside the hour of the version change
               Window(CHANGE - timedelta(minutes=10), CHANGE + timedelta(minutes=20))]
    answers = []
    for n, win in enumerate(windows):
        answers.append(_views(rollup, win, METERS, every=n == 0))  # fills the hours it needs
        assert answers[-1] == _views(raw, win, METERS, every=n == 0), win
    # every whole hour from the rollup now (filled above), still the raw figures
    assert _views(rollup, windows[0], METERS, every=True) == answers[0]
    assert rollup.last_rollup_stats is not None and rollup.last_rollup_stats.hours_filled == 0
    assert rollup.last_rollup_stats.hours_from_rollup > 0

    # the figures themselves, from the events sent (not from ClickHouse): the version change decides
    whole = windows[0]
    totals = {m["meter"]: m for m in rollup.usage_totals(project_id="prj_r", win=whole, meters=METERS)["meters"]}

    def counted(e: dict[str, Any]) -> tuple[bool, Any]:
        before = datetime.fromisoformat(e["time"]) < CHANGE
        if not before and e["data"]["model"] != "large":
            return False, None
        return True, e["data"]["units" if before else "alt"]

    def number(value: Any) -> Decimal | None:
        if isinstance(value, bool) or value is None:
            return None
        try:
            return Decimal(str(value))
        except ArithmeticError:
            return None

    in_meter = [(e, v) for e in events for ok, v in [counted(e)] if ok]
    sums = [number(v) for _, v in in_meter]
    valid_sum = [n for n in sums if n is not None and n >= 0]
    assert Decimal(totals["sum"]["units"]) == sum(valid_sum)
    assert totals["sum"]["rejected_events"] == len(in_meter) - len(valid_sum)
    assert totals["count"]["units"] == str(len(in_meter))
    assert Decimal(totals["max"]["units"]) == max(n for n in sums if n is not None)
    latest = max(((datetime.fromisoformat(e["time"]), number(v)) for e, v in in_meter if number(v) is not None),
                 key=lambda t: t[0])
    assert Decimal(totals["latest"]["units"]) == latest[1]
    scalars = {str(v) if not isinstance(v, str) else f'"{v}"' for _, v in in_meter if v is not None}
    assert int(totals["unique_count"]["units"]) == len(scalars)


def test_rollup_is_read_and_a_late_event_refills_its_hour(topics, producer, ch, run_sink, services):
    rollup, raw = services
    rng = random.Random(7)
    topic = topics.name(TOPIC_USAGE_EVENTS)
    sent = _send(producer, topic, _events(rng, 300))
    sink = run_sink()
    sink.wait_messages({topic: sent})
    win = Window(START, START + timedelta(days=3))
    counting = [m for m in METERS if m.aggregation == "COUNT"]

    rollup.usage_totals(project_id="prj_r", win=win, meters=counting)
    stats = rollup.last_rollup_stats
    assert stats is not None and stats.hours_filled > 0 and stats.fill_failures == 0
    rollup.usage_totals(project_id="prj_r", win=win, meters=counting)
    stats = rollup.last_rollup_stats
    assert stats is not None and stats.hours_filled == 0 and stats.hours_from_rollup > 0

    # the rollup is what answers: corrupt it and the answer moves by exactly the corruption
    expected = raw.usage_totals(project_id="prj_r", win=win, meters=counting)["meters"][0]["units"]
    filled_rows = int(ch.query(f"SELECT count() FROM `{rollup.db}`.meter_usage_by_hour").result_rows[0][0])
    ch.command(f"ALTER TABLE `{rollup.db}`.meter_usage_by_hour UPDATE events = events + 1000 WHERE 1 "
               "SETTINGS mutations_sync = 1")
    corrupted = rollup.usage_totals(project_id="prj_r", win=win, meters=counting)["meters"][0]["units"]
    assert filled_rows > 0 and int(corrupted) - int(expected) == 1000 * filled_rows
    ch.command(f"ALTER TABLE `{rollup.db}`.meter_usage_by_hour UPDATE events = events - 1000 WHERE 1 "
               "SETTINGS mutations_sync = 1")
    assert rollup.usage_totals(project_id="prj_r", win=win, meters=counting)["meters"][0]["units"] == expected

    # an event arriving late into a filled hour: that hour's fill no longer matches its count -> refilled
    late = usage_event(project="prj_r", subject="late", units=5, model="small",
                       time_=START + timedelta(hours=1, minutes=30, milliseconds=7))
    producer.send(topic, late, key="late")
    producer.flush()
    sink.wait_messages({topic: sent + 1})
    after = rollup.usage_totals(project_id="prj_r", win=win, meters=counting)
    stats = rollup.last_rollup_stats
    assert stats is not None and stats.hours_filled == 1
    assert int(after["meters"][0]["units"]) == int(expected) + 1
    assert after == raw.usage_totals(project_id="prj_r", win=win, meters=counting)
