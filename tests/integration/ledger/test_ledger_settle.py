"""Usage settled later (ledger/settle.py): a checkpoint prices usage and counts it against the wallet at once, a settle
pass posts it — one transaction per key for however many checkpoints moved it — and every money invariant holds at
every commit, with the balance figures users and access rules see computed as if the usage were posted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Connection, Engine, text

from ledger import queries, service
from ledger.checkpoints import apply_checkpoints
from ledger.contracts import (
    ChargeCheckpoint,
    CounterKey,
    CounterValue,
    PriceModel,
    PriceTier,
    TransactionKind,
)
from ledger.errors import InsufficientCredits, WalletBlocked
from ledger.expiry import expire_credits
from ledger.invariant_check import check_invariants
from ledger.settle import run_settler, settle_all, settle_usage

pytestmark = pytest.mark.integration

TOPIC = "usage.events.v1"
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PER_TOKEN = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))


def _value(wallet: str, units: str, *, meter: str = "tokens", price: PriceModel = PER_TOKEN,
           aggregation: str = "sum", latest_at: datetime | None = None) -> CounterValue:
    return CounterValue(key=CounterKey(wallet_id=wallet, project_id="p1", meter_id=meter, period_start=PERIOD,
                                       price_version_id="v1"),
                        units=Decimal(units), price=price, aggregation=aggregation,  # type: ignore[arg-type]
                        latest_at=latest_at, events=1)


def _checkpoint(as_of: int, *values: CounterValue, partition: int = 0) -> ChargeCheckpoint:
    return ChargeCheckpoint(source_topic=TOPIC, partition=partition, as_of_offset=as_of, counters=list(values),
                            dedupe_keys=[], emitted_at=datetime.now(UTC))


def _apply_later(engine: Engine, checkpoint: ChargeCheckpoint, *, settle_later: bool = True) -> int:
    """Apply with usage left for the settle pass; returns the amount accrued (positive = charged)."""
    with engine.begin() as conn:
        merged = apply_checkpoints(conn, [checkpoint], settle_later=settle_later)
    assert merged.outcome.status == "applied"
    assert merged.outcome.transactions == 0 if settle_later else merged.outcome.accrued_minor == 0
    return merged.outcome.accrued_minor


def _wallet(engine: Engine, wallet_id: str, grant_minor: int) -> None:
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref=wallet_id, wallet_id=wallet_id)
        if grant_minor:
            service.grant_credits(conn, wallet_id=wallet_id, amount_minor=grant_minor, idempotency_key=f"g-{wallet_id}")


def _usage(engine: Engine, wallet_id: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [(int(amount), key) for amount, key in conn.execute(text(
            "SELECT amount_minor, idempotency_key FROM transactions WHERE wallet_id = :w AND kind = 'usage' ORDER BY id"),
            {"w": wallet_id}).all()]


def _balance(engine: Engine, wallet_id: str) -> tuple[int, int, int]:
    """(balance, unsettled, available)"""
    with engine.connect() as conn:
        view = queries.get_balance(conn, wallet_id)
    assert view is not None
    return view.balance_minor, view.unsettled_minor, view.available_minor


def test_usage_counts_at_once_and_posts_once_per_key_when_settled(engine: Engine,
                                                                  invariants: Callable[[], None]) -> None:
    _wallet(engine, "W", 100)
    assert _apply_later(engine, _checkpoint(10, _value("W", "90"))) == 36
    assert _apply_later(engine, _checkpoint(20, _value("W", "93"))) == 1  # 37 − 36: cumulative, as when posted
    assert _usage(engine, "W") == []  # nothing posted yet ...
    assert _balance(engine, "W") == (100, 37, 63)  # ... but already spent
    invariants()  # balance = Σ transactions and every other invariant hold while usage is unsettled

    with engine.begin() as conn:
        outcome = settle_usage(conn)
    assert (outcome.keys, outcome.wallets, outcome.amount_minor) == (1, 1, 37)
    assert _usage(engine, "W") == [(-37, f"usage:settle:1:W:tokens:{PERIOD.isoformat()}:v1")]
    assert _balance(engine, "W") == (63, 0, 63)
    with engine.begin() as conn:
        assert settle_usage(conn).keys == 0  # nothing left: a second pass posts nothing

    assert _apply_later(engine, _checkpoint(30, _value("W", "100"))) == 3
    assert settle_all(engine).amount_minor == 3
    assert [key.split(":")[2] for _, key in _usage(engine, "W")] == ["1", "2"]  # each settlement has its own name
    assert _balance(engine, "W") == (60, 0, 60)
    invariants()


def test_a_charge_that_fell_is_credited_back_when_settled(engine: Engine, invariants: Callable[[], None]) -> None:
    """A LATEST gauge that fell (or a volume tier that got cheaper) accrues a negative amount: more available at
    once, posted as a positive usage transaction (into a refund bucket) when settled."""
    _wallet(engine, "G", 100)
    at = datetime(2026, 11, 2, tzinfo=UTC)
    assert _apply_later(engine, _checkpoint(1, _value("G", "50", aggregation="latest", latest_at=at))) == 20
    with engine.begin() as conn:
        assert settle_usage(conn).amount_minor == 20
    assert _apply_later(engine, _checkpoint(2, _value("G", "10", aggregation="latest",
                                                      latest_at=at.replace(hour=1)))) == -16
    assert _balance(engine, "G") == (80, -16, 96)
    settle_all(engine)
    assert [amount for amount, _ in _usage(engine, "G")] == [-20, 16]
    assert _balance(engine, "G") == (96, 0, 96)
    invariants()


def test_a_debit_cannot_spend_what_unsettled_usage_took(engine: Engine, invariants: Callable[[], None]) -> None:
    _wallet(engine, "D", 100)
    _apply_later(engine, _checkpoint(1, _value("D", "200")))  # 80 of the 100, unposted
    with engine.begin() as conn, pytest.raises(InsufficientCredits):
        service.debit(conn, wallet_id="D", amount_minor=30, idempotency_key="d-too-much")
    with engine.begin() as conn:
        service.debit(conn, wallet_id="D", amount_minor=20, idempotency_key="d-fits")
    _apply_later(engine, _checkpoint(2, _value("D", "300")))  # 120 in all: 20 beyond what is left
    assert _balance(engine, "D") == (80, 120, 0)
    with engine.begin() as conn, pytest.raises(WalletBlocked):  # in debt once settled: blocked now
        service.debit(conn, wallet_id="D", amount_minor=1, idempotency_key="d-blocked")
    settle_all(engine)
    assert _balance(engine, "D") == (-40, 0, 0)  # the usage beyond the credit is debt, never dropped
    invariants()


def test_a_correction_posts_at_once_and_leaves_the_unsettled_part_alone(engine: Engine,
                                                                        invariants: Callable[[], None]) -> None:
    _wallet(engine, "C", 1_000)
    _apply_later(engine, _checkpoint(1, _value("C", "100")))  # 40 unsettled
    with engine.begin() as conn:  # a replay correction of a later offset: an adjustment, posted now
        apply_checkpoints(conn, [_checkpoint(2, _value("C", "150"))], kind=TransactionKind.ADJUSTMENT,
                          reason="replay", settle_later=True)
    with engine.connect() as conn:
        kinds = conn.execute(text("SELECT kind, amount_minor FROM transactions WHERE wallet_id = 'C' "
                                  "AND kind <> 'top_up' ORDER BY id")).all()
    assert [(k, int(a)) for k, a in kinds] == [("adjustment", -20)]
    assert _balance(engine, "C") == (980, 40, 940)
    settle_all(engine)
    assert _usage(engine, "C")[0][0] == -40
    assert _balance(engine, "C") == (940, 0, 940)  # 60 = price(150) in all, posted once
    invariants()


def test_graduated_price_across_many_wallets_settles_in_bounded_passes(engine: Engine,
                                                                       invariants: Callable[[], None]) -> None:
    tiers = PriceModel(model="graduated", tiers=[PriceTier(up_to=Decimal(10), unit_price_minor=Decimal(2)),
                                                 PriceTier(up_to=None, unit_price_minor=Decimal(1))])
    wallets = [f"M{i:03d}" for i in range(25)]
    for w in wallets:
        _wallet(engine, w, 50)
    _apply_later(engine, _checkpoint(1, *[_value(w, str(i), price=tiers) for i, w in enumerate(wallets)]))
    _apply_later(engine, _checkpoint(2, *[_value(w, str(2 * i), price=tiers) for i, w in enumerate(wallets)]))
    expected = {w: -(2 * min(2 * i, 10) + max(2 * i - 10, 0)) for i, w in enumerate(wallets)}
    outcome = settle_all(engine, keys_max=7)  # four passes, one transaction each
    assert outcome.keys == 24 and outcome.amount_minor == -sum(expected.values())  # M000 used nothing
    for w in wallets:
        assert sum(amount for amount, _ in _usage(engine, w)) == expected[w]
    invariants()


@pytest.mark.parametrize("settle_later", [True, False], ids=["settled-later", "posted-at-once"])
def test_settling_while_checkpoints_apply_neither_deadlocks_nor_loses_a_minor_unit(
        engine: Engine, invariants: Callable[[], None], settle_later: bool) -> None:
    """Two partitions' appliers and the settle thread on the same wallets: lock order (charges, then wallets in id
    order) keeps them deadlock-free, and what ends posted is exactly each key's price. Each applier's first
    checkpoint inserts new keys of every wallet (KEY SHARE on the wallet rows, by the foreign keys) before locking
    the wallets: with FOR UPDATE wallet locks the two appliers deadlocked, whether usage posts at once or later
    (ledger/books.py)."""
    wallets = [f"X{i:02d}" for i in range(40)]
    for w in wallets:
        _wallet(engine, w, 10_000)
    stop = threading.Event()
    settler = threading.Thread(target=run_settler, args=(engine, stop), kwargs={"interval_s": 0.01})
    settler.start()
    errors: list[BaseException] = []

    def applier(partition: int) -> None:
        try:
            for step in range(1, 31):
                _apply_later(engine, _checkpoint(step, *[_value(w, str(step * (partition + 1)), meter=f"m{partition}")
                                                         for w in wallets], partition=partition),
                             settle_later=settle_later)
        except BaseException as exc:  # reported below
            errors.append(exc)

    appliers = [threading.Thread(target=applier, args=(p,)) for p in (0, 1)]
    for t in appliers:
        t.start()
    for t in appliers:
        t.join(timeout=120)
    stop.set()
    settler.join(timeout=30)
    assert errors == [], [str(e) for e in errors]
    settle_all(engine)
    for w in wallets:  # m0: 30 units, m1: 60 units, at 0.4 → 12 + 24
        assert sum(amount for amount, _ in _usage(engine, w)) == -36
        assert _balance(engine, w) == (10_000 - 36, 0, 10_000 - 36)
    invariants()


def test_the_invariant_check_reports_unsettled_usage_that_disagrees_with_the_charges(engine: Engine) -> None:
    _wallet(engine, "U", 100)
    _apply_later(engine, _checkpoint(1, _value("U", "10")))
    with engine.begin() as conn:
        assert "unsettled_vs_charges" not in check_invariants(conn).violations
        conn.execute(text("UPDATE wallets SET unsettled_minor = 0 WHERE id = 'U'"))
        found = check_invariants(conn)
    assert found.violations["unsettled_vs_charges"]["sample"][0]["computed"] == 4


def test_usage_metered_before_credit_expires_burns_it_first(engine: Engine, invariants: Callable[[], None]) -> None:
    """The expiry job settles a wallet's usage before expiring its credit: what was metered while the credit lived
    burns it, as when usage posts at once — the breakage is only what is left, and no debt appears."""
    expires = datetime(2026, 12, 1, tzinfo=UTC)
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="E", wallet_id="E")
        service.grant_credits(conn, wallet_id="E", amount_minor=100, idempotency_key="g-E", kind="promo",
                              expires_at=expires)
    _apply_later(engine, _checkpoint(1, _value("E", "90")))  # 36, unposted
    with engine.begin() as conn:
        assert expire_credits(conn, now=expires.replace(day=2)) == 1
    with engine.connect() as conn:
        posted = [(k, int(a)) for k, a in conn.execute(text(
            "SELECT kind, amount_minor FROM transactions WHERE wallet_id = 'E' ORDER BY id")).all()]
    assert posted == [("promo", 100), ("usage", -36), ("expiry", -64)]
    assert _balance(engine, "E") == (0, 0, 0)
    invariants()


def test_the_settle_thread_posts_on_its_interval_and_counts_what_it_posted(engine: Engine,
                                                                          invariants: Callable[[], None]) -> None:
    def settled_keys() -> float:
        return REGISTRY.get_sample_value("meterline_ledger_settled_keys_total") or 0.0

    for w in ("T1", "T2"):
        _wallet(engine, w, 50)
    _apply_later(engine, _checkpoint(1, _value("T1", "10"), _value("T2", "20"), _value("T2", "5", meter="images")))
    before = settled_keys()
    stop = threading.Event()
    settler = threading.Thread(target=run_settler, args=(engine, stop), kwargs={"interval_s": 0.05})
    settler.start()
    try:
        deadline = time.monotonic() + 30
        while _balance(engine, "T2")[1] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        settler.join(timeout=30)
    assert [_balance(engine, w) for w in ("T1", "T2")] == [(46, 0, 46), (40, 0, 40)]
    assert settled_keys() - before == 3
    invariants()


def test_the_background_pass_leaves_a_key_an_applier_holds_for_the_next_pass(engine: Engine,
                                                                            invariants: Callable[[], None]) -> None:
    for w in ("S1", "S2"):
        _wallet(engine, w, 50)
    _apply_later(engine, _checkpoint(1, _value("S1", "10"), _value("S2", "10")))
    with engine.connect() as holder:  # an applier in the middle of its transaction holds S1's charge row
        holder.execute(text("SELECT 1 FROM usage_charges WHERE wallet_id = 'S1' FOR UPDATE"))
        with engine.begin() as conn:
            outcome = settle_usage(conn, skip_locked=True)  # does not wait
        assert (outcome.keys, outcome.wallets) == (1, 1)
        holder.rollback()
    assert [_balance(engine, w) for w in ("S1", "S2")] == [(50, 4, 46), (46, 0, 46)]
    assert settle_all(engine, skip_locked=True).keys == 1
    assert _balance(engine, "S1") == (46, 0, 46)
    invariants()


def _row_writes(conn: Connection, table: str) -> tuple[int, int]:
    """(rows updated, of which HOT: in place, no index entry written) in ``table`` by this backend, counted up to now
    (the counts of its earlier transactions are included until they are reported: compare two readings taken in one
    transaction)."""
    updated, hot = conn.execute(text(
        "SELECT pg_stat_get_xact_tuples_updated(t), pg_stat_get_xact_tuples_hot_updated(t) FROM CAST(:t AS regclass) t"),
        {"t": table}).one()
    return int(updated), int(hot)


def test_a_settle_pass_writes_each_wallet_and_bucket_once_in_place(engine: Engine,
                                                                   invariants: Callable[[], None]) -> None:
    """A settle pass used to write each wallet twice (its balance, then its unsettled amount) and rewrote every
    burned bucket's index entries (the burn-order index was partial on the amount). Per wallet now: one update of
    the wallet row, and the buckets it burns without emptying them are updated in place (HOT, ledger_0017)."""
    for wallet in ("A", "B", "C"):
        _wallet(engine, wallet, 1_000)
        _apply_later(engine, _checkpoint(ord(wallet), _value(wallet, "10"), partition=ord(wallet)))
        _apply_later(engine, _checkpoint(ord(wallet) + 1, _value(wallet, "20", meter="images"), partition=ord(wallet)))
    with engine.begin() as conn:
        before = _row_writes(conn, "wallets"), _row_writes(conn, "credit_buckets")
        outcome = settle_usage(conn)
        after = _row_writes(conn, "wallets"), _row_writes(conn, "credit_buckets")
    wallets, buckets = ((a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True))
    assert (outcome.keys, outcome.wallets, outcome.amount_minor) == (6, 3, 36)
    assert wallets[0] == 3  # one row version per wallet, two keys each
    assert buckets == (3, 3)  # each wallet's one bucket, burned (not emptied) in place
    assert [_balance(engine, w) for w in ("A", "B", "C")] == [(988, 0, 988)] * 3
    invariants()
