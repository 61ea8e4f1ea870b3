"""ledger/reconcile_compare.py: which of the four records of the same usage disagree (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ledger.reconcile_compare import Reading, compare_readings, disagreeing, drift_by_pair, drift_wallets

PERIOD = datetime(2026, 12, 1, tzinfo=UTC)
A = ("w-alice", "prj", "tokens", PERIOD, "pv1")
B = ("w-bob", "prj", "tokens", PERIOD, "pv1")


@pytest.mark.parametrize(("values", "named"), [
    ({"usage_log": 3, "ledger": 3, "clickhouse_usage": 3}, ()),
    ({"usage_log": 3, "ledger": 3, "clickhouse_usage": 1}, ("clickhouse_usage",)),
    ({"usage_log": 3, "ledger": 2, "clickhouse_usage": 3}, ("ledger",)),
    ({"usage_log": 4, "ledger": 3, "clickhouse_usage": 3}, ("usage_log",)),  # both copies agree: the log is odd
    ({"usage_log": 1, "ledger": 2, "clickhouse_usage": 3}, ("usage_log", "ledger", "clickhouse_usage")),
    ({"usage_log": 3, "clickhouse_usage": 2}, ("clickhouse_usage",)),  # two records: the copy is named
    ({"usage_log": 3, "ledger": 2}, ("ledger",)),
    ({"ledger": 12, "clickhouse_flow": 8}, ("clickhouse_flow",)),
])
def test_the_odd_record_is_named(values: dict[str, int], named: tuple[str, ...]) -> None:
    assert disagreeing(values) == named


def test_a_missing_key_is_zero_a_record_left_out_is_not_compared_and_drift_is_summed_per_pair() -> None:
    three = Reading("units", "ledger mark", {"usage_log": {A: Decimal(30), B: Decimal(5)},
                                             "ledger": {A: Decimal(30), B: Decimal(5)},
                                             "clickhouse_usage": {A: Decimal(10)}})  # bob's rows all gone
    flow = Reading("charged_minor", "posted before t", {"ledger": {A: 12}, "clickhouse_flow": {A: 12, B: 2}})
    found = compare_readings([three, flow], price=lambda key, units: int(Decimal(units) * Decimal("0.4")))
    assert [(m.key[0], m.measure, m.disagreeing, m.amount_minor) for m in found] == [
        ("w-alice", "units", ("clickhouse_usage",), 8), ("w-bob", "units", ("clickhouse_usage",), 2),
        ("w-bob", "charged_minor", ("clickhouse_flow",), -2)]
    assert found[1].as_row()["values"] == {"usage_log": "5", "ledger": "5", "clickhouse_usage": "0"}
    assert found[0].as_row()["period_start"] == "2026-12-01T00:00:00+00:00"
    assert drift_wallets(found) == {"usage_log": 0, "ledger": 0, "clickhouse_usage": 2, "clickhouse_flow": 1}
    assert drift_by_pair(found) == {"usage_log/clickhouse_usage": 10, "ledger/clickhouse_flow": 2}
    assert compare_readings([Reading("units", "x", {"usage_log": {A: Decimal(1)}, "ledger": {A: Decimal("1.0")}})]) == []
