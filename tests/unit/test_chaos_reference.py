"""The chaos run's reference model (bench/chaos_load.Reference) on hand-computed cases: it is the spec the chaos
bench and test hold the ledger to, so its rules are pinned here — continued pricing across price versions with a
floored fractional price, late events charged in the arrival's month at the arrival's version, resends once,
images counting versions, and the other tenant's wallets apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bench.chaos_load import IMAGES, OTHER_PROJECT, TOKENS, Reference
from streams.catalog_model import auto_wallet_id

P = "prj_ref"
START = datetime(2020, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _event(i: int, etype: str, value: int, at: datetime, *, subject: str = "alice", project: str = P) -> dict[str, object]:
    data = {"tokens": value} if etype == TOKENS else {"n": value}
    return {"id": f"e{i}", "source": "t", "type": etype, "subject": subject, "project": project,
            "time": at.isoformat(), "data": data}


def test_a_new_price_version_continues_the_period_and_floors_once_per_run() -> None:
    ref = Reference(P, [(START, "0.4")])
    change = NOW + timedelta(seconds=10)
    ref.accept(_event(1, TOKENS, 3, NOW), NOW)  # 3 × 0.4 = 1.2 → 1
    ref.add_price_version(change, "0.5")  # recorded after the first event: the version is looked up at the end
    ref.accept(_event(2, TOKENS, 3, change), change)  # at the change: the new version
    ref.accept(_event(2, TOKENS, 3, change), change)  # a resend: counted once
    ref.accept(_event(3, TOKENS, 1, NOW - timedelta(minutes=5)), change)  # out of order: version 0.4 by its time
    # v1: 4 units → floor(1.6) = 1; v2 continues at 4: floor(0.5 × 7) − floor(0.5 × 4) = 3 − 2 = 1
    assert ref.expected_balances() == {(P, auto_wallet_id(P, "alice")): -2}


def test_a_late_event_is_charged_in_the_arrivals_month_at_the_arrivals_version() -> None:
    ref = Reference(P, [(START, "1"), (NOW - timedelta(hours=1), "2")])
    november = datetime(2026, 11, 29, tzinfo=UTC)  # its month ended > 1 h before the arrival: late
    ref.accept(_event(1, TOKENS, 10, november), NOW)
    ref.accept(_event(2, TOKENS, 5, datetime(2026, 12, 1, 0, 30, tzinfo=UTC)), NOW)  # December, version 1: on time
    # one December run: version "1" 5 units → 5, then version "2" continues at 5 with 10 units → 2 × 15 − 2 × 5 = 20
    assert ref.expected_balances() == {(P, auto_wallet_id(P, "alice")): -25}


def test_images_count_per_counting_version_and_the_other_tenant_is_apart() -> None:
    ref = Reference(P, [(START, "1")])
    ref.accept(_event(1, IMAGES, 4, NOW), NOW)
    ref.accept(_event(2, IMAGES, 6, NOW), NOW)  # SUM: 10
    ref.images_version = (2, "MAX")  # a meter edit: new counters from here
    ref.accept(_event(3, IMAGES, 3, NOW), NOW)
    ref.accept(_event(4, IMAGES, 7, NOW), NOW)
    ref.accept(_event(5, IMAGES, 5, NOW), NOW)  # MAX: 7
    ref.accept(_event(6, TOKENS, 9, NOW, project=OTHER_PROJECT), NOW)  # the other tenant, our subject's name
    assert ref.expected_balances() == {(P, auto_wallet_id(P, "alice")): -17,
                                       (OTHER_PROJECT, auto_wallet_id(OTHER_PROJECT, "alice")): -9}
