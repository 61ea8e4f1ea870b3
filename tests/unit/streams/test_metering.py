"""The pure metering core: validation verdicts, units, periods, lateness, dedupe and cumulative checkpoints.

The central property (DESIGN §2.2): however a partition's messages are cut into batches, and wherever the
worker crashes and a new one seeds from what the ledger applied, the ledger ends with exactly the totals of
processing every event once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.contracts import ChargeCheckpoint, PriceModel
from streams.catalog_model import (
    CatalogSnapshot,
    Filter,
    Meter,
    PriceVersion,
    ProjectPolicy,
    auto_wallet_id,
    parse_path,
)
from streams.contracts import partition_for
from streams.metering import (
    REASONS,
    Limits,
    PartitionAggregator,
    SeedCounter,
    dedupe_hash,
    parse_message,
    period_bounds,
)

D = Decimal
ARRIVAL = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
PER_UNIT = PriceModel(model="per_unit", unit_price_minor=D("0.4"))


def meter(mid: str, *, aggregation: str = "SUM", prop: str | None = "$.tokens", event_type: str = "llm",
          filters: tuple[Filter, ...] = (), project: str = "p1") -> Meter:
    return Meter(id=mid, project_id=project, slug=mid, event_type=event_type, aggregation=aggregation,
                 value_property=prop, filters=filters, value_steps=parse_path(prop) if prop else ())


def price(pid: str, meter_id: str, *, model: PriceModel = PER_UNIT, period: str = "month",
          effective_from: datetime = datetime(2020, 1, 1, tzinfo=UTC), version: int = 1) -> PriceVersion:
    return PriceVersion(id=pid, price_id=f"price-{meter_id}", meter_id=meter_id, project_id="p1", version=version,
                        model=model, period=period, effective_from=effective_from,  # type: ignore[arg-type]
                        model_json=model.model_dump(mode="json"))


def catalog(meters: list[Meter] | None = None, prices: list[PriceVersion] | None = None, *,
            subjects: dict[tuple[str, str], str] | None = None, unknown: str = "auto_provision",
            lateness_s: int = 3600) -> CatalogSnapshot:
    meters = meters if meters is not None else [meter("tokens")]
    prices = prices if prices is not None else [price("pv1", "tokens")]
    return CatalogSnapshot.build(meters=meters, price_versions=prices, subject_keys=subjects or {},
                                 policies={}, default_policy=ProjectPolicy(unknown, lateness_s))  # type: ignore[arg-type]


def event(i: int | str, *, subject: str = "alice", tokens: object = 1, time: str | None = "2026-11-15T11:00:00Z",
          etype: str = "llm", **extra: object) -> dict[str, object]:
    ev: dict[str, object] = {"specversion": "1.0", "id": str(i), "source": "test", "type": etype,
                             "subject": subject, "project": "p1", "data": {"tokens": tokens}}
    if time is not None:
        ev["time"] = time
    ev.update(extra)
    return ev


def agg(partitions: int = 1) -> PartitionAggregator:
    return PartitionAggregator(source_topic="usage", partition=0, partitions=partitions)


def units_of(a: PartitionAggregator) -> dict[str, Decimal]:
    return {key[0]: c.units for key, c in a.counters.items()}


# -- parsing and validation ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", "bad_json"),
    (b"42", "not_an_object"),
    (b"[]", "empty_batch"),
    (b"[42]", "not_an_object"),
    (orjson.dumps({**event(1), "id": None}), "missing_field"),
    (orjson.dumps({k: v for k, v in event(1).items() if k != "project"}), "missing_field"),
    (orjson.dumps({**event(1), "subject": 7}), "wrong_type"),
    (orjson.dumps({**event(1), "data": [1, 2]}), "wrong_type"),
    (orjson.dumps({**event(1), "specversion": "0.3"}), "unsupported_specversion"),
    (orjson.dumps(event(1, time="yesterday")), "bad_time"),
    (orjson.dumps(event(1, time="2026-11-15T11:00:00")), "bad_time"),
    (orjson.dumps(event(1, time="2026-11-17T11:00:00Z")), "time_in_future"),
    (orjson.dumps(event(1, etype="nope")), "unknown_meter"),
    (orjson.dumps(event(1, tokens="many")), "bad_value"),
    (orjson.dumps(event(1, tokens=-3)), "bad_value"),
    (orjson.dumps(event(1, tokens=True)), "bad_value"),
    (orjson.dumps({**event(1), "data": {}}), "bad_value"),
    (orjson.dumps(event(1, pad="x" * 70_000)), "oversized"),
])
def test_bad_events_are_rejected_with_a_stable_reason_and_their_bytes(raw: bytes, reason: str) -> None:
    a = agg()
    rejections = a.process(offset=0, value=raw, arrival=ARRIVAL, catalog=catalog())
    assert [r.reason for r in rejections] == [reason]
    assert reason in REASONS
    [rejection] = rejections
    if rejection.index is None:  # the whole message is kept byte for byte
        assert rejection.original == raw
    else:  # an element of a packed message is kept as that element's JSON
        assert orjson.loads(rejection.original) == orjson.loads(raw)[rejection.index]
    assert a.counters == {}


def test_a_packed_message_rejects_only_its_bad_events_and_counts_the_rest() -> None:
    a = agg()
    packed = [event(1, tokens=5), event(2, tokens="x"), 7, event(3, tokens=2), event(4, pad="y" * 70_000)]
    rejections = a.process(offset=0, value=orjson.dumps(packed), arrival=ARRIVAL, catalog=catalog())
    assert sorted((r.index, r.reason) for r in rejections) == [(1, "bad_value"), (2, "not_an_object"),
                                                                (4, "oversized")]
    assert orjson.loads(next(r for r in rejections if r.index == 1).original) == packed[1]
    assert units_of(a) == {auto_wallet_id("p1", "alice"): D(7)}


def test_parse_message_limits_the_events_of_one_message() -> None:
    _, rejections = parse_message(orjson.dumps([event(i) for i in range(5)]), limits=Limits(message_events_max=4))
    assert [r.reason for r in rejections] == ["too_many_events"]


# -- units, meters, wallets ------------------------------------------------------------------------------

def test_aggregations_sum_count_max_latest_unique() -> None:
    meters = [meter("sum"), meter("count", aggregation="COUNT", prop=None), meter("max", aggregation="MAX"),
              meter("latest", aggregation="LATEST"), meter("uniq", aggregation="UNIQUE_COUNT", prop="$.model")]
    cat = catalog(meters, [price(f"pv-{m.id}", m.id) for m in meters])
    a = agg()
    rows = [(5, "a", "2026-11-15T10:00:00Z"), ("2.5", "b", "2026-11-15T09:00:00Z"), (1.25, "a", "2026-11-15T10:30:00Z")]
    for i, (tokens, model, time) in enumerate(rows):
        ev = event(i, tokens=tokens, time=time)
        ev["data"] = {"tokens": tokens, "model": model}
        assert a.process(offset=i, value=orjson.dumps(ev), arrival=ARRIVAL, catalog=cat) == []
    by_meter = {key[2]: c for key, c in a.counters.items()}
    assert by_meter["sum"].units == D("8.75")
    assert by_meter["count"].units == 3
    assert by_meter["max"].units == 5
    assert by_meter["latest"].units == D("1.25")  # the event with the latest time, not the last to arrive
    assert by_meter["uniq"].units == 2
    assert all(c.events == 3 for c in by_meter.values())


def test_filters_pick_meters_and_an_unmatched_event_is_not_charged() -> None:
    gpt4 = meter("gpt4", filters=(Filter.from_json({"property": "$.model", "in": ["gpt-4", "gpt-4o"]}),))
    cat = catalog([gpt4], [price("pv", "gpt4")])
    a = agg()
    for i, model in enumerate(["gpt-4", "gpt-3", "gpt-4o"]):
        ev = event(i)
        ev["data"] = {"tokens": 10, "model": model}
        assert a.process(offset=i, value=orjson.dumps(ev), arrival=ARRIVAL, catalog=cat) == []
    assert list(units_of(a).values()) == [D(20)]
    assert a.stats.unmetered == 1


def test_subject_keys_map_to_wallets_and_unknown_subjects_follow_the_project_policy() -> None:
    cat = catalog(subjects={("p1", "alice"): "w-alice", ("p1", "alice-key-2"): "w-alice"})
    a = agg()
    a.process(offset=0, value=orjson.dumps([event(1, tokens=2), event(2, subject="alice-key-2", tokens=3),
                                            event(3, subject="bob", tokens=4)]), arrival=ARRIVAL, catalog=cat)
    assert units_of(a) == {"w-alice": D(5), auto_wallet_id("p1", "bob"): D(4)}
    strict = catalog(unknown="dead_letter")
    rejections = agg().process(offset=0, value=orjson.dumps(event(1, subject="carol")), arrival=ARRIVAL,
                               catalog=strict)
    assert [r.reason for r in rejections] == ["unknown_subject"]


def test_auto_provisioned_wallet_ids_are_deterministic_and_distinct() -> None:
    assert auto_wallet_id("p1", "bob") == auto_wallet_id("p1", "bob")
    assert auto_wallet_id("p1", "bob") != auto_wallet_id("p2", "bob")
    assert auto_wallet_id("p1", "bo") != auto_wallet_id("p1b", "o")


def test_fractional_json_numbers_become_exact_decimals() -> None:
    a = agg()
    for i in range(10):
        a.process(offset=i, value=orjson.dumps(event(i, tokens=0.1)), arrival=ARRIVAL, catalog=catalog())
    assert list(units_of(a).values()) == [D("1.0")]


# -- periods, lateness, price versions -------------------------------------------------------------------

def test_period_bounds_month_and_day_in_utc() -> None:
    assert period_bounds(datetime(2026, 12, 31, 23, 59, tzinfo=UTC), "month") == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds(datetime(2026, 2, 3, 4, tzinfo=UTC), "day") == (
        datetime(2026, 2, 3, tzinfo=UTC), datetime(2026, 2, 4, tzinfo=UTC))


def test_late_events_within_lateness_keep_their_period_beyond_it_go_to_the_current_one() -> None:
    arrival = datetime(2026, 12, 1, 0, 30, tzinfo=UTC)
    a = agg()
    cat = catalog(lateness_s=3600)
    a.process(offset=0, value=orjson.dumps(event(1, time="2026-11-30T23:50:00Z")), arrival=arrival, catalog=cat)
    assert [k[3] for k in a.counters] == [datetime(2026, 11, 1, tzinfo=UTC)]
    late_arrival = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    a.process(offset=1, value=orjson.dumps(event(2, time="2026-11-30T23:50:00Z")), arrival=late_arrival, catalog=cat)
    dec = a.counters[next(k for k in a.counters if k[3] == datetime(2026, 12, 1, tzinfo=UTC))]
    assert (dec.units, dec.events, dec.late_events) == (1, 1, 1)
    assert a.stats.late == 1


def test_the_price_version_in_effect_at_the_event_time_is_used() -> None:
    switch = datetime(2026, 11, 10, tzinfo=UTC)
    cat = catalog(prices=[price("v1", "tokens"), price("v2", "tokens", effective_from=switch, version=2)])
    a = agg()
    a.process(offset=0, value=orjson.dumps([event(1, time="2026-11-09T00:00:00Z"), event(2, time="2026-11-11T00:00:00Z")]),
              arrival=ARRIVAL, catalog=cat)
    assert sorted(k[4] for k in a.counters) == ["v1", "v2"]


def test_events_without_time_use_the_message_arrival() -> None:
    a = agg()
    a.process(offset=0, value=orjson.dumps(event(1, time=None)), arrival=ARRIVAL, catalog=catalog())
    [(key, counter)] = a.counters.items()
    assert key[3] == datetime(2026, 11, 1, tzinfo=UTC)
    assert counter.latest_at == ARRIVAL


# -- dedupe and offsets ----------------------------------------------------------------------------------

def test_duplicates_are_counted_once_and_a_replayed_offset_is_skipped() -> None:
    a = agg()
    a.process(offset=0, value=orjson.dumps([event(1, tokens=5), event(1, tokens=5)]), arrival=ARRIVAL, catalog=catalog())
    a.process(offset=1, value=orjson.dumps(event(1, tokens=5)), arrival=ARRIVAL, catalog=catalog())
    a.process(offset=1, value=orjson.dumps(event(2, tokens=5)), arrival=ARRIVAL, catalog=catalog())  # redelivery
    assert list(units_of(a).values()) == [D(5)]
    assert (a.stats.duplicates, a.stats.skipped_messages) == (2, 1)


def test_dedupe_keys_expire_after_the_horizon_in_stream_time() -> None:
    a = PartitionAggregator(source_topic="usage", partition=0, partitions=1, limits=Limits(dedupe_horizon_s=60))
    a.process(offset=0, value=orjson.dumps(event(1)), arrival=ARRIVAL, catalog=catalog())
    a.process(offset=1, value=orjson.dumps(event(2)), arrival=ARRIVAL + timedelta(seconds=30), catalog=catalog())
    a.checkpoint()
    assert a.dedupe_size == 2
    assert a.checkpoint() is None  # nothing new: no checkpoint, no pruning either
    # the stream (not the wall clock) moves past the horizon of event 1 only
    a.process(offset=2, value=b"garbage", arrival=ARRIVAL + timedelta(seconds=61), catalog=catalog())
    a.checkpoint()
    assert a.dedupe_size == 1
    a.process(offset=3, value=orjson.dumps(event(1)), arrival=ARRIVAL + timedelta(seconds=62), catalog=catalog())
    assert a.stats.duplicates == 0  # beyond the horizon a resend is a new event (documented limit)
    a.process(offset=4, value=orjson.dumps(event(2)), arrival=ARRIVAL + timedelta(seconds=62), catalog=catalog())
    assert a.stats.duplicates == 1


def test_a_worker_far_behind_the_wall_clock_still_catches_a_retry() -> None:
    """Issue 13 item 5: the horizon was measured against the wall clock, so a worker 24 h behind forgot every
    key at the next checkpoint and charged a retry twice. Stream time: nothing here reads the clock."""
    a = PartitionAggregator(source_topic="usage", partition=0, partitions=1)  # 24 h horizon
    day_ago = datetime.now(UTC) - timedelta(hours=25)
    t = day_ago.isoformat()
    a.process(offset=0, value=orjson.dumps(event("first", tokens=7, time=t)), arrival=day_ago, catalog=catalog())
    assert a.checkpoint() is not None
    a.process(offset=1, value=orjson.dumps(event("other", tokens=1, time=t)),
              arrival=day_ago + timedelta(minutes=5), catalog=catalog())
    assert a.checkpoint() is not None
    a.process(offset=2, value=orjson.dumps(event("first", tokens=7, time=t)),  # the producer's retry
              arrival=day_ago + timedelta(minutes=10), catalog=catalog())
    assert a.stats.duplicates == 1
    assert sum(units_of(a).values()) == D(8)


def test_dedupe_hash_is_a_stable_signed_64_bit_int() -> None:
    h = dedupe_hash("p1", "src", "id-1")
    assert h == dedupe_hash("p1", "src", "id-1") != dedupe_hash("p1", "src", "id-2")
    assert -(2**63) <= h < 2**63


def test_misplaced_events_are_counted_and_charged() -> None:
    a = PartitionAggregator(source_topic="usage", partition=0, partitions=8)
    subjects = [f"s{i}" for i in range(40)]
    a.process(offset=0, value=orjson.dumps([event(i, subject=s) for i, s in enumerate(subjects)]), arrival=ARRIVAL,
              catalog=catalog())
    assert a.stats.accepted == 40
    assert a.stats.misplaced == sum(1 for s in subjects if partition_for(s, 8) != 0) > 0


# -- checkpoints -----------------------------------------------------------------------------------------


def test_checkpoint_json_carries_each_counters_own_price_and_exact_times() -> None:
    """``to_json`` serializes each price once per checkpoint and leaves datetimes to orjson: two meters with
    different prices in one checkpoint must each arrive with their own price, effective date and latest time."""
    graduated = PriceModel(model="graduated", tiers=({"up_to": D(10), "unit_price_minor": D(2)},  # type: ignore[arg-type]
                                                     {"unit_price_minor": D("0.5")}))
    later = datetime(2026, 11, 2, 3, 4, 5, 600007, tzinfo=UTC)
    cat = catalog([meter("tokens"), meter("calls", aggregation="COUNT", prop=None)],
                  [price("pv1", "tokens"), price("pv2", "calls", model=graduated, effective_from=later)])
    a = agg()
    a.process(offset=5, value=orjson.dumps([event(i, subject=f"s{i % 3}", tokens=i,
                                                  time=f"2026-11-15T11:00:0{i}.00012{i}Z") for i in range(1, 7)]),
              arrival=ARRIVAL, catalog=cat)
    cp = a.checkpoint()
    assert cp is not None
    parsed = ChargeCheckpoint.model_validate_json(cp.to_json(emitted_at=ARRIVAL, owner_epoch=7))
    assert (parsed.emitted_at, parsed.stream_time, parsed.owner_epoch) == (ARRIVAL, cp.stream_time, 7)
    assert len(parsed.counters) == len(cp.counters) == 6
    for value, ((wallet_id, project_id, meter_id, period_start, version), counter) in zip(parsed.counters,
                                                                                            cp.counters, strict=True):
        assert counter.price is not None
        assert (value.key.wallet_id, value.key.project_id, value.key.meter_id, value.key.period_start,
                value.key.price_version_id) == (wallet_id, project_id, meter_id, period_start, version)
        assert (value.price, value.price_effective_from) == (counter.price.model, counter.price.effective_from)
        assert (value.units, value.events, value.latest_at) == (counter.units, counter.events, counter.latest_at)
    assert {v.key.price_version_id: v.price for v in parsed.counters} == {"pv1": PER_UNIT, "pv2": graduated}

def test_checkpoint_json_is_a_valid_charge_checkpoint_with_cumulative_values() -> None:
    a = agg()
    a.process(offset=3, value=orjson.dumps([event(1, tokens=90)]), arrival=ARRIVAL, catalog=catalog())
    first = a.checkpoint()
    assert first is not None
    parsed = ChargeCheckpoint.model_validate_json(first.to_json(emitted_at=ARRIVAL))
    assert (parsed.source_topic, parsed.partition, parsed.as_of_offset) == ("usage", 0, 3)
    [value] = parsed.counters
    assert (value.units, value.events, value.price, value.aggregation) == (D(90), 1, PER_UNIT, "sum")
    assert value.key.period_start == datetime(2026, 11, 1, tzinfo=UTC)
    assert parsed.dedupe_keys == [dedupe_hash("p1", "test", "1")]
    a.process(offset=4, value=orjson.dumps(event(2, tokens=3)), arrival=ARRIVAL, catalog=catalog())
    second = a.checkpoint()
    assert second is not None
    assert [c.units for _, c in second.counters] == [D(93)]  # cumulative, never a delta
    assert a.checkpoint() is None  # nothing consumed since


def test_a_batch_of_only_rejected_events_still_advances_the_checkpoint_offset() -> None:
    a = agg()
    a.process(offset=7, value=b"garbage", arrival=ARRIVAL, catalog=catalog())
    cp = a.checkpoint()
    assert cp is not None and cp.as_of_offset == 7 and cp.counters == []


def test_seeding_skips_applied_offsets_and_continues_from_the_ledger_values() -> None:
    a = agg()
    w = auto_wallet_id("p1", "alice")
    a.seed(applied_through=10, counters=[SeedCounter(w, "p1", "tokens", datetime(2026, 11, 1, tzinfo=UTC), "pv1",
                                                     D(90), 4)],
           dedupe_keys=[(dedupe_hash("p1", "test", "old"), ARRIVAL)])
    a.process(offset=10, value=orjson.dumps(event("x", tokens=1000)), arrival=ARRIVAL, catalog=catalog())
    a.process(offset=11, value=orjson.dumps([event("old", tokens=1000), event("new", tokens=3)]), arrival=ARRIVAL,
              catalog=catalog())
    cp = a.checkpoint()
    assert cp is not None
    [(_, counter)] = cp.counters
    assert (counter.units, counter.events, cp.as_of_offset) == (D(93), 5, 11)


# -- the protocol as a property: any batching, any crash points ------------------------------------------

class FakeLedger:
    """The ledger's checkpoint rule in miniature (apply iff as_of > applied; store cumulatives + dedupe)."""

    def __init__(self) -> None:
        self.applied = -1
        self.counters: dict[tuple[object, ...], tuple[Decimal, int]] = {}
        self.dedupe: set[int] = set()

    def apply(self, payload: bytes) -> None:
        cp = ChargeCheckpoint.model_validate_json(payload)
        if cp.as_of_offset <= self.applied:
            return
        for c in cp.counters:
            k = c.key
            self.counters[(k.wallet_id, k.project_id, k.meter_id, k.period_start, k.price_version_id)] = (
                c.units, c.events)
        self.dedupe.update(cp.dedupe_keys)
        self.applied = cp.as_of_offset

    def seed(self, a: PartitionAggregator, *, with_dedupe: bool = True) -> None:
        a.seed(applied_through=self.applied,
               counters=[SeedCounter(k[0], k[1], k[2], k[3], k[4], u, n)  # type: ignore[arg-type]
                         for k, (u, n) in self.counters.items()],
               dedupe_keys=[(h, ARRIVAL) for h in self.dedupe] if with_dedupe else [])


messages = st.lists(
    st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["a", "b", "c"]), st.integers(0, 50)),
             min_size=1, max_size=5),
    min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(msgs=messages, cuts=st.lists(st.integers(1, 6), min_size=1, max_size=40),
       crashes=st.lists(st.booleans(), min_size=1, max_size=40),
       lost=st.lists(st.booleans(), min_size=1, max_size=40), unique_ids=st.booleans())
def test_totals_are_exact_under_any_batching_crash_and_lost_checkpoint(
        msgs: list[list[tuple[int, str, int]]], cuts: list[int], crashes: list[bool], lost: list[bool],
        unique_ids: bool) -> None:
    # unique_ids: every event is distinct and the seed carries NO dedupe keys (horizon passed), so only the
    # offset skip stands between a replay and a double charge.
    if unique_ids:
        msgs = [[(o * 100 + j, s, t) for j, (_, s, t) in enumerate(events)] for o, events in enumerate(msgs)]
    expected: dict[str, Decimal] = {}
    seen: set[int] = set()
    for events in msgs:
        for eid, subject, tokens in events:
            if eid not in seen:
                seen.add(eid)
                expected[auto_wallet_id("p1", subject)] = expected.get(auto_wallet_id("p1", subject), D(0)) + tokens
    payloads = [orjson.dumps([event(eid, subject=s, tokens=t) for eid, s, t in events]) for events in msgs]
    ledger = FakeLedger()
    cat = catalog()
    a = agg()
    ledger.seed(a)
    # a worker consumes from its committed position: the offset after the last batch whose checkpoint was
    # acknowledged; a crash loses in-memory state and unacknowledged work (the checkpoint may or may not
    # have reached the ledger).
    committed = 0
    offset = 0
    step = 0
    while offset < len(payloads):
        n = cuts[step % len(cuts)]
        for o in range(offset, min(offset + n, len(payloads))):
            a.process(offset=o, value=payloads[o], arrival=ARRIVAL, catalog=cat)
        offset = min(offset + n, len(payloads))
        cp = a.checkpoint()
        crashed = step < len(crashes) and crashes[step]  # a bounded number of crashes, then it runs clean
        if cp is not None and not (crashed and lost[step % len(lost)]):
            ledger.apply(cp.to_json(emitted_at=ARRIVAL))
            if not crashed:
                committed = offset  # delivery awaited before the next batch, then faust commits
        if crashed:
            a = agg()
            ledger.seed(a, with_dedupe=not unique_ids)  # the ledger has applied everything below `committed` (the wait step)
            assert ledger.applied >= committed - 1
            offset = committed
        step += 1
    totals: dict[str, Decimal] = {}
    for (wallet, *_), (units, _) in ledger.counters.items():
        totals[wallet] = totals.get(wallet, D(0)) + units
    assert {w: u for w, u in totals.items() if u} == {w: u for w, u in expected.items() if u}


@given(st.text(min_size=1, max_size=40), st.integers(1, 64))
def test_partition_for_is_in_range_and_stable(subject: str, partitions: int) -> None:
    p = partition_for(subject, partitions)
    assert 0 <= p < partitions
    assert p == partition_for(subject, partitions)


def test_partition_for_matches_kafka_murmur2_vectors() -> None:
    # Kafka's Utils.murmur2("21") = -973932308 (from the Java client's tests)
    from streams.contracts import murmur2

    assert murmur2(b"21") - 2**32 == -973932308


def test_periods_older_than_the_seeded_window_are_never_written() -> None:
    a = agg()
    floor = datetime(2026, 10, 1, tzinfo=UTC)
    a.seed(applied_through=-1, counters=[], dedupe_keys=[], periods_since=floor)
    # a backlog message: arrived (and happened) in August, long before the seeded window
    old = datetime(2026, 8, 20, tzinfo=UTC)
    a.process(offset=0, value=orjson.dumps(event(1, time="2026-08-20T00:00:00Z")), arrival=old, catalog=catalog())
    [(key, counter)] = a.counters.items()
    assert key[3] == floor and counter.late_events == 1


def test_a_checkpoint_is_cut_before_it_outgrows_one_kafka_message() -> None:
    a = PartitionAggregator(source_topic="usage", partition=0, partitions=1,
                            limits=Limits(checkpoint_counters_max=50, checkpoint_dedupe_keys_max=10**6))
    cuts = []
    for offset in range(10):
        a.process(offset=offset, value=orjson.dumps([event(f"{offset}-{i}", subject=f"s{offset}-{i}")
                                                     for i in range(20)]), arrival=ARRIVAL, catalog=catalog())
        if a.checkpoint_full():
            cp = a.checkpoint()
            assert cp is not None and len(cp.counters) <= 60
            assert len(cp.to_json(emitted_at=ARRIVAL)) < 1024 * 1024
            cuts.append(cp.as_of_offset)
    assert cuts == [2, 5, 8]


def test_a_dead_letter_names_every_missing_attribute() -> None:
    from streams.metering import Rejection, validate_event

    raw = {"specversion": "1.0", "type": "llm", "project": "p1", "data": {"tokens": 1}}  # no id, source, subject
    rejection = validate_event(raw, index=None, message=orjson.dumps(raw), arrival=ARRIVAL, limits=Limits())
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.detail) == ("missing_field", "id, source, subject are required")


# -- bounded arithmetic (DESIGN §2 invariant 8, ledger/limits.py) -------------------------------------------

def test_values_beyond_the_ledgers_bounds_are_dead_lettered_and_the_partition_goes_on() -> None:
    from ledger.limits import UNITS_PER_EVENT_MAX

    a, cat = agg(), catalog()
    huge_int = b'{"specversion":"1.0","id":"x1","source":"test","type":"llm","subject":"alice","project":"p1",' \
               b'"time":"2026-11-15T11:00:00Z","data":{"tokens":' + b"1" + b"0" * 30 + b"}}"
    hostile = [huge_int, orjson.dumps(event("x2", tokens=1e300)), orjson.dumps(event("x3", tokens="1e30")),
               orjson.dumps(event("x4", tokens="1e-300")), orjson.dumps(event("x5", tokens=2**63)),
               orjson.dumps(event("x6", tokens=int(UNITS_PER_EVENT_MAX) + 1))]
    offset = 0
    for value in hostile:
        [rejection] = a.process(offset=offset, value=value, arrival=ARRIVAL, catalog=cat)
        assert rejection.reason == "value_out_of_range", value
        offset += 1
    for i in range(3):  # the partition keeps charging exactly
        assert a.process(offset=offset, value=orjson.dumps(event(f"ok{i}", tokens=100)), arrival=ARRIVAL,
                         catalog=cat) == []
        offset += 1
    assert units_of(a) == {auto_wallet_id("p1", "alice"): D(300)}
    cp = a.checkpoint()
    assert cp is not None and cp.as_of_offset == offset - 1 and len(cp.dedupe_keys) == 3


def test_a_cumulative_that_would_overflow_is_dead_lettered_not_emitted() -> None:
    from ledger.limits import AMOUNT_MINOR_MAX, UNITS_PER_EVENT_MAX

    # 1,000 minor per unit: the charge reaches the bound at 10^12 units, long before the units bound
    pricey = PriceModel(model="per_unit", unit_price_minor=D(1000))
    a, cat = agg(), catalog(prices=[price("pv1", "tokens", model=pricey)])
    limit = D(AMOUNT_MINOR_MAX) / 1000
    step = UNITS_PER_EVENT_MAX / 4
    offset, accepted = 0, D(0)
    while accepted + step <= limit:
        assert a.process(offset=offset, value=orjson.dumps(event(f"e{offset}", tokens=int(step))),
                         arrival=ARRIVAL, catalog=cat) == []
        accepted += step
        offset += 1
    [rejection] = a.process(offset=offset, value=orjson.dumps(event("over", tokens=int(step))), arrival=ARRIVAL,
                            catalog=cat)
    assert rejection.reason == "value_out_of_range"
    [(_, counter)] = a.checkpoint().counters  # type: ignore[union-attr]
    assert counter.units == accepted == limit
    # a smaller event still fits
    assert a.process(offset=offset + 1, value=orjson.dumps(event("small", tokens=0)), arrival=ARRIVAL,
                     catalog=cat) == []


def test_a_price_whose_single_unit_exceeds_the_bound_is_refused() -> None:
    from ledger.limits import AMOUNT_MINOR_MAX, price_units_max

    assert price_units_max(PriceModel(model="per_unit", unit_price_minor=D(AMOUNT_MINOR_MAX) * 2)) == 0
    assert price_units_max(PER_UNIT) == D(10**15)
    graduated = PriceModel(model="graduated", tiers=({"up_to": "10", "unit_price_minor": "1"},
                                                    {"unit_price_minor": "10", "flat_price_minor": "5"}))
    from ledger.pricing import price_minor
    bound = price_units_max(graduated)
    assert price_minor(graduated, bound) <= AMOUNT_MINOR_MAX


# -- catalog changes never rewrite history (DESIGN §2 invariant 9) ------------------------------------------

def test_a_meter_edit_that_changes_counting_starts_new_counters_and_keeps_the_charged_ones() -> None:
    """Issue 13 item 3: SUM → MAX on a live meter re-priced the old counter (2,000 → 1,000 charged)."""
    a = agg()
    sum_v1 = catalog()
    for i in range(2):
        a.process(offset=i, value=orjson.dumps(event(i, tokens=1000)), arrival=ARRIVAL, catalog=sum_v1)
    first = a.checkpoint()
    assert first is not None
    [(old_key, old)] = first.counters
    assert (old_key[4], old.units) == ("pv1", D(2000))
    # version 2 renames (keeps counting), version 3 switches to MAX (counts differently from here on)
    renamed = catalog([Meter(**{**_fields(meter("tokens")), "version": 2})])
    a.process(offset=2, value=orjson.dumps(event(2, tokens=10)), arrival=ARRIVAL, catalog=renamed)
    as_max = catalog([Meter(**{**_fields(meter("tokens", aggregation="MAX")), "version": 3, "counting_version": 3})])
    a.process(offset=3, value=orjson.dumps(event(3, tokens=1000)), arrival=ARRIVAL, catalog=as_max)
    a.process(offset=4, value=orjson.dumps(event(4, tokens=400)), arrival=ARRIVAL, catalog=as_max)
    second = a.checkpoint()
    assert second is not None
    by_version = {key[4]: c for key, c in second.counters}
    assert by_version["pv1"].units == D(2010)  # the SUM counter is not touched by MAX events
    assert (by_version["pv1@m3"].units, by_version["pv1@m3"].aggregation) == (D(1000), "max")
    cp = ChargeCheckpoint.model_validate_json(second.to_json(emitted_at=ARRIVAL))
    versions = {c.key.price_version_id: c.meter_version for c in cp.counters}
    assert versions == {"pv1": 1, "pv1@m3": 3}
    assert all(c.price_effective_from == datetime(2020, 1, 1, tzinfo=UTC) for c in cp.counters)


def _fields(m: Meter) -> dict[str, object]:
    return {name: getattr(m, name) for name in m.__slots__}  # type: ignore[attr-defined]


@pytest.mark.parametrize("attribute", ["id", "source", "type", "subject", "project"])
@pytest.mark.parametrize(("value", "reason", "detail"), [
    ("", "missing_field", "{name} is required"),
    (None, "missing_field", "{name} is required"),
    (7, "wrong_type", "{name} must be a string"),
    ("x" * 257, "wrong_type", "{name} is longer than 256"),
])
def test_each_attribute_is_checked_whatever_its_position(attribute: str, value: object, reason: str,
                                                          detail: str) -> None:
    from streams.metering import Rejection, validate_event

    raw = {**event(1), attribute: value}
    rejection = validate_event(raw, index=None, message=orjson.dumps(raw), arrival=ARRIVAL, limits=Limits())
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.detail) == (reason, detail.format(name=attribute))
    fits = validate_event({**event(1), attribute: "x" * 256}, index=None, message=b"", arrival=ARRIVAL,
                          limits=Limits())
    assert not isinstance(fits, Rejection)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(min_value=-(10**13), max_value=10**13), st.integers(min_value=-(2**70), max_value=2**70)),
       st.sampled_from(["SUM", "MAX", "LATEST"]))
def test_an_integer_value_is_judged_as_its_decimal_string(value: int, aggregation: str) -> None:
    """JSON integers skip the decimal-places check (they have none); the verdict and the units are those of the
    same number written as a string, which takes the full check."""
    cat = catalog([meter("tokens", aggregation=aggregation)])
    as_int, as_text = agg(), agg()
    # written by hand: orjson does not serialise integers beyond 64 bits (a producer in another language may)
    as_int_json = orjson.dumps(event(1, tokens=0)).replace(b'"tokens":0', b'"tokens":' + str(value).encode())
    verdicts = [a.process(offset=0, value=message, arrival=ARRIVAL, catalog=cat)
                for a, message in ((as_int, as_int_json), (as_text, orjson.dumps(event(1, tokens=str(value)))))]
    assert [[r.reason for r in v] for v in verdicts] == [[r.reason for r in verdicts[1]]] * 2
    assert units_of(as_int) == units_of(as_text)
