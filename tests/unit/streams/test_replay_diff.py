"""`meterline replay`'s pure core (streams/replay_diff.py): the range selects keys, each key is compared whole
and priced with its own price version, the correction repairs exactly the drift, max/latest above the log are
reported but never applied, and the replay id is deterministic."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson
from test_metering import ARRIVAL, catalog, event, meter, price

from ledger.checkpoints import merge_units
from ledger.contracts import PriceModel
from ledger.corrections import KeyCharge, StoredCounter
from ledger.pricing import price_minor
from streams.catalog_model import auto_wallet_id
from streams.metering import Limits
from streams.replay import LogMessage
from streams.replay_diff import PartitionRun, Selection, diff_keys, replay_id, replay_partition

SWITCH = datetime(2026, 11, 10, tzinfo=UTC)
V1 = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))
V2 = PriceModel(model="graduated", tiers=({"up_to": Decimal(10), "unit_price_minor": Decimal(1)},  # type: ignore[arg-type]
                                          {"unit_price_minor": Decimal(3)}))


def _run(messages: list[bytes], selection: Selection, cat: object = None) -> PartitionRun:
    log = [LogMessage(offset, value, ARRIVAL) for offset, value in enumerate(messages)]
    return replay_partition(source_id="usage", partition=0, partitions=1, applied_through=len(log) - 1,
                            messages=log, catalog=cat or catalog(), limits=Limits(), selection=selection)


def _stored(run: PartitionRun, *, drop: set[str] = frozenset(), units: dict[str, Decimal] | None = None,  # type: ignore[assignment]
            source: str = "usage") -> list[StoredCounter]:
    """What a faithful ledger holds for ``run`` (keys whose price version is in ``drop`` lost)."""
    return [StoredCounter(key, source, 0, (units or {}).get(key[4], c.units), c.latest_at, c.events)
            for key, c in run.counters.items() if key[4] not in drop]


def _charges(stored: list[StoredCounter], models: dict[str, PriceModel], aggregation: str = "sum"
             ) -> dict[tuple[str, str, str, datetime, str], KeyCharge]:
    return {s.key: KeyCharge(price_minor(models[s.key[4]], s.units), aggregation, models[s.key[4]]) for s in stored}


def test_a_replay_across_a_price_change_prices_each_side_with_its_own_version() -> None:
    cat = catalog(prices=[price("v1", "tokens", model=V1),
                          price("v2", "tokens", model=V2, effective_from=SWITCH, version=2)])
    messages = [orjson.dumps([event(i, tokens=10, time="2026-11-09T00:00:00Z") for i in range(3)]),
                orjson.dumps([event(10 + i, tokens=7, time="2026-11-11T00:00:00Z") for i in range(2)])]
    everything = Selection(partitions=(0,))
    run = _run(messages, everything, cat)
    assert {key[4]: c.units for key, c in run.counters.items()} == {"v1": Decimal(30), "v2": Decimal(14)}
    faithful = _stored(run)
    assert diff_keys([run], source_id="usage", selection=everything, life=faithful, every=faithful,
                     charges=_charges(faithful, {"v1": V1, "v2": V2})) == []
    # the checkpoint that carried the new version's key was lost: only that key differs, priced with v2
    lost = _stored(run, drop={"v2"})
    [drift] = diff_keys([run], source_id="usage", selection=everything, life=lost, every=lost,
                        charges=_charges(lost, {"v1": V1}))
    assert drift.key[4] == "v2" and (drift.ledger_units, drift.replayed_units) == (None, Decimal(14))
    assert drift.amount_minor == 10 * 1 + 4 * 3  # graduated v2 over 14 units, not 0.4 × 14
    assert drift.correction is not None and drift.correction.price == V2 and drift.correction.units == Decimal(14)


def test_a_range_selects_the_keys_its_events_touched_and_compares_them_whole() -> None:
    messages = [orjson.dumps(event(1, subject="alice", tokens=5)), orjson.dumps(event(2, subject="bob", tokens=9)),
                orjson.dumps(event(3, subject="alice", tokens=4))]
    alice = auto_wallet_id("p1", "alice")
    for selection, expected in ((Selection(partitions=(0,), from_offset=1, to_offset=1), set()),  # bob's only
                                (Selection(partitions=(0,), from_offset=2), {alice}),
                                (Selection(partitions=(0,)), {alice})):
        run = _run(messages, selection)
        # alice's last message (4 units) was never applied: the ledger holds 5 of her 9
        stored = [StoredCounter(k, "usage", 0, Decimal(5) if k[0] == alice else c.units, c.latest_at, c.events)
                  for k, c in run.counters.items()]
        drifts = diff_keys([run], source_id="usage", selection=selection, life=stored, every=stored,
                           charges=_charges(stored, {"pv1": V1}))
        assert {d.key[0] for d in drifts} == expected, selection
        for d in drifts:  # compared whole: all 9 units of the period, not the 4 of the range
            assert (d.ledger_units, d.replayed_units, d.amount_minor) == (Decimal(5), Decimal(9), 3 - 2)


def test_a_correction_row_counts_on_the_ledger_side_so_a_repaired_key_reports_zero() -> None:
    run = _run([orjson.dumps(event(1, tokens=25))], Selection(partitions=(0,)))
    stored = _stored(run, units={"pv1": Decimal(10)})
    [drift] = diff_keys([run], source_id="usage", selection=Selection(partitions=(0,)), life=stored, every=stored,
                        charges=_charges(stored, {"pv1": V1}))
    assert drift.correction is not None and drift.correction.units == Decimal(15) and drift.amount_minor == 10 - 4
    correction = StoredCounter(stored[0].key, "replay:usage:rp_x", 0, Decimal(15), None, 1)
    repaired = [*stored, correction]
    assert diff_keys([run], source_id="usage", selection=Selection(partitions=(0,)), life=repaired, every=repaired,
                     charges=_charges(stored, {"pv1": V1})) == []
    # another life's counters of the same key are priced but not compared (that log is gone)
    older = StoredCounter(stored[0].key, "usage@0", 0, Decimal(100), None, 9)
    [again] = diff_keys([run], source_id="usage", selection=Selection(partitions=(0,)), life=stored,
                        every=[*stored, older], charges={stored[0].key: KeyCharge(price_minor(V1, Decimal(110)),
                                                                                   "sum", V1)})
    assert again.amount_minor == price_minor(V1, Decimal(125)) - price_minor(V1, Decimal(110))


def test_a_max_key_above_the_log_is_reported_but_never_repaired() -> None:
    cat = catalog(meters=[meter("peak", aggregation="MAX")], prices=[price("pv1", "peak")])
    run = _run([orjson.dumps(event(1, tokens=30))], Selection(partitions=(0,)), cat)
    stored = _stored(run, units={"pv1": Decimal(50)})
    [drift] = diff_keys([run], source_id="usage", selection=Selection(partitions=(0,)), life=stored, every=stored,
                        charges=_charges(stored, {"pv1": V1}, "max"))
    assert drift.correction is None and drift.amount_minor == 0
    below = _stored(run, units={"pv1": Decimal(20)})
    [fixable] = diff_keys([run], source_id="usage", selection=Selection(partitions=(0,)), life=below, every=below,
                          charges=_charges(below, {"pv1": V1}, "max"))
    assert fixable.correction is not None and merge_units("max", [(Decimal(20), None), (fixable.correction.units,
                                                                                         None)]) == Decimal(30)


def test_the_replay_id_is_deterministic_and_names_the_ledger_state_and_selection() -> None:
    s = Selection(partitions=(0, 1), from_offset=3)
    assert replay_id(source_id="u", marks={0: 5, 1: 7}, selection=s) == replay_id(source_id="u", marks={1: 7, 0: 5},
                                                                                  selection=s)
    assert replay_id(source_id="u", marks={0: 5, 1: 8}, selection=s) != replay_id(source_id="u", marks={0: 5, 1: 7},
                                                                                  selection=s)
    assert replay_id(source_id="u", marks={0: 5}, selection=Selection(partitions=(0,), project_id="p")) != \
        replay_id(source_id="u", marks={0: 5}, selection=Selection(partitions=(0,)))
