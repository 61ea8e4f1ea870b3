"""The demo's scenario: what it expects the ledger to end with is computed right (so `meterline demo` can fail)."""

from __future__ import annotations

from meterline.cli_demo import DEMO_SUBJECT, plan_demo


def _graduated_by_hand(units: int) -> int:
    """DEMO_PRICE_MODEL in integer arithmetic: 1,000 free, then 0.05 for the next 100,000, 0.02 beyond; floored.
    (The free allowance comes off before the tiers, so the tiers count billable units.)"""
    billable = max(0, units - 1_000)
    first = min(billable, 100_000)
    rest = billable - first
    return (first * 5 + rest * 2) // 100


def test_plan_prices_the_events_it_sends() -> None:
    for events in (1, 3, 2_000):
        plan = plan_demo(events=events, seed=events)
        assert len(plan.events) == events
        assert plan.units == sum(e["data"]["tokens"] for e in plan.events)
        assert plan.expected_charge_minor == _graduated_by_hand(plan.units)
        assert plan.expected_balance_minor == plan.grant_minor - plan.expected_charge_minor - plan.debit_minor
        assert {e["subject"] for e in plan.events} == {DEMO_SUBJECT}
        assert len({e["id"] for e in plan.events}) == events  # distinct ids: only the resends are duplicates
        assert plan.resent and all(r is e for r, e in zip(plan.resent, plan.events, strict=False))


def test_plan_crosses_both_paid_tiers() -> None:
    plan = plan_demo(events=2_000, seed=7)  # the demo's defaults
    assert plan.units > 100_000 and plan.expected_charge_minor > 0
    assert plan.expected_balance_minor > 0  # the demo shows credits going down, not debt
