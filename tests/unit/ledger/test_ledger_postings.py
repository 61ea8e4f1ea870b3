"""Burn order, debt and debt settlement, balance arithmetic — the pure core of every posting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.postings import Allocation, Bucket, NewBucket, WalletBalance, WalletBook

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _bucket(id_: int, remaining: int, *, priority: int = 100, expires_days: int | None = None,
            created_days: int = 0) -> Bucket:
    expires = T0 + timedelta(days=expires_days) if expires_days is not None else None
    return Bucket(id_, priority, expires, T0 + timedelta(days=created_days), remaining)


def test_burns_priority_then_soonest_expiry_then_oldest_then_id() -> None:
    buckets = [
        _bucket(1, 10, priority=100),                      # paid, no expiry, oldest
        _bucket(2, 10, priority=100, expires_days=30),     # paid, expires later
        _bucket(3, 10, priority=100, expires_days=5),      # paid, expires soonest
        _bucket(4, 10, priority=10, created_days=3),       # promo: lowest priority number burns first
        _bucket(5, 10, priority=100, created_days=-1),     # paid, no expiry, even older than 1
        _bucket(6, 10, priority=100, created_days=-1),     # same as 5 except id: id breaks the tie
    ]
    book = WalletBook(balance_minor=60, buckets=buckets, now=T0)
    posting = book.debit(55)
    assert [a.bucket_id for a in posting.allocations] == [4, 3, 2, 5, 6, 1]
    assert [a.amount_minor for a in posting.allocations] == [-10, -10, -10, -10, -10, -5]
    assert (posting.balance_before_minor, posting.balance_after_minor, posting.amount_minor) == (60, 5, -55)
    assert book.changed == {4: 0, 3: 0, 2: 0, 5: 0, 6: 0, 1: 5}


def test_usage_beyond_the_buckets_becomes_debt_not_dropped() -> None:
    book = WalletBook(balance_minor=30, buckets=[_bucket(1, 30)], now=T0)
    posting = book.debit(50)
    assert posting.allocations == (Allocation(1, -30), Allocation(None, -20))
    assert book.balance_minor == -20
    assert WalletBalance(book.balance_minor, 0, 0).blocked
    assert WalletBalance(book.balance_minor, 0, 0).debt_minor == 20


def test_a_credit_settles_debt_first_and_buckets_the_rest() -> None:
    book = WalletBook(balance_minor=-20, buckets=[], now=T0)
    posting = book.credit(50, NewBucket("top_up", 100))
    assert posting.debt_settled_minor == 20
    assert posting.allocations == (Allocation(None, 20), Allocation(-1, 30))
    assert book.created[-1][1] == 30 and book.balance_minor == 30
    partial = book.debit(40)  # the new bucket (30) burns, the rest is debt again
    assert partial.allocations == (Allocation(-1, -30), Allocation(None, -10))
    small = book.credit(4, NewBucket("bonus", 20))
    assert small.allocations == (Allocation(None, 4),) and small.new_bucket_id is None
    assert book.balance_minor == -6


def _promo_and_top_up(top_up_left: int = 1000) -> WalletBook:
    """A promo bucket expiring soon (burns first in burn order) next to a top-up bucket (id 2)."""
    buckets = [_bucket(1, 200, priority=10, expires_days=3), _bucket(2, top_up_left), _bucket(3, 50, priority=20)]
    return WalletBook(balance_minor=250 + top_up_left, buckets=buckets, now=T0)


def test_a_named_bucket_burns_before_the_burn_order() -> None:
    book = _promo_and_top_up()
    posting = book.debit(1000, first={2})
    assert posting.allocations == (Allocation(2, -1000),)  # the promo and the bonus are untouched
    assert book.changed == {2: 0} and book.balance_minor == 250


def test_a_partly_spent_named_bucket_gives_what_is_left_then_burn_order() -> None:
    book = _promo_and_top_up(top_up_left=300)
    posting = book.debit(420, first=[2])
    assert posting.allocations == (Allocation(2, -300), Allocation(1, -120))
    assert book.changed == {2: 0, 1: 80} and book.balance_minor == 130


@pytest.mark.parametrize("named", [{2}, {99}, set()], ids=["spent or expired", "not this wallet's", "none"])
def test_a_named_bucket_with_nothing_left_leaves_the_burn_order(named: set[int]) -> None:
    """An emptied bucket (spent, or its remainder posted as expiry) is not in the book: plain burn order."""
    book = WalletBook(balance_minor=250, buckets=[_bucket(1, 200, priority=10, expires_days=3), _bucket(2, 0),
                                                  _bucket(3, 50, priority=20)], now=T0)
    posting = book.debit(220, first=named)
    assert posting.allocations == (Allocation(1, -200), Allocation(3, -20))


def test_a_named_debit_beyond_every_bucket_becomes_debt() -> None:
    book = _promo_and_top_up(top_up_left=100)
    posting = book.debit(400, first={2})
    assert posting.allocations == (Allocation(2, -100), Allocation(1, -200), Allocation(3, -50),
                                   Allocation(None, -50))
    assert book.balance_minor == -50 and WalletBalance(book.balance_minor, 0, 0).blocked


def test_several_named_buckets_burn_in_burn_order_among_themselves() -> None:
    book = _promo_and_top_up(top_up_left=100)
    posting = book.debit(120, first={2, 3})
    assert posting.allocations == (Allocation(3, -50), Allocation(2, -70))


def test_expiry_posts_only_the_remainder() -> None:
    book = WalletBook(balance_minor=25, buckets=[_bucket(1, 5, expires_days=1), _bucket(2, 20)], now=T0)
    posting = book.expire(1)
    assert posting is not None and posting.amount_minor == -5 and posting.allocations == (Allocation(1, -5),)
    assert book.expire(1) is None
    assert book.balance_minor == 20


def test_a_book_refuses_state_that_breaks_the_invariant() -> None:
    with pytest.raises(AssertionError, match="invariant"):
        WalletBook(balance_minor=10, buckets=[_bucket(1, 9)], now=T0)
    with pytest.raises(AssertionError, match="invariant"):
        WalletBook(balance_minor=-1, buckets=[_bucket(1, 1)], now=T0)


@pytest.mark.parametrize(("balance", "held", "floor", "amount", "ok", "available"), [
    (100, 0, 0, 100, True, 100),
    (100, 0, 0, 101, False, 100),
    (100, 30, 0, 71, False, 70),
    (100, 30, 10, 60, True, 60),
    (100, 30, -50, 120, True, 120),  # a negative floor is an overdraft allowance
    (-5, 0, 0, 0, False, 0),
])
def test_sync_debits_respect_held_and_floor(balance: int, held: int, floor: int, amount: int, ok: bool,
                                            available: int) -> None:
    state = WalletBalance(balance, held, floor)
    assert state.can_debit(amount) is ok
    assert state.available_minor == available


@given(balance=st.integers(-1_000, 1_000), held=st.integers(0, 500), floor=st.integers(-200, 200),
       unsettled=st.integers(-300, 1_000), amount=st.integers(0, 1_000))
def test_unsettled_usage_reads_as_if_it_were_posted(balance: int, held: int, floor: int, unsettled: int,
                                                    amount: int) -> None:
    """Usage priced but not posted yet (ledger/settle.py) is already spent: every figure equals that of the wallet
    with the usage posted (a negative unsettled amount is a credit back on its way)."""
    pending = WalletBalance(balance, held, floor, unsettled)
    posted = WalletBalance(balance - unsettled, held, floor)
    assert (pending.available_minor, pending.debt_minor, pending.blocked, pending.can_debit(amount)) == (
        posted.available_minor, posted.debt_minor, posted.blocked, posted.can_debit(amount))


ops = st.lists(st.tuples(st.sampled_from(["debit", "debit_first", "credit", "expire"]), st.integers(0, 200)),
               max_size=40)


@given(initial=st.lists(st.integers(1, 100), max_size=6), operations=ops)
@settings(max_examples=300, deadline=None)
def test_any_sequence_keeps_balance_equal_to_bucket_credit_and_chains(initial: list[int],
                                                                       operations: list[tuple[str, int]]) -> None:
    book = WalletBook(balance_minor=sum(initial),
                      buckets=[_bucket(i + 1, r, priority=i % 3) for i, r in enumerate(initial)], now=T0)
    balance = sum(initial)
    for op, amount in operations:
        if op == "debit":
            posting = book.debit(amount)
        elif op == "debit_first":  # a named bucket (maybe empty or unknown) gives first, the rest in burn order
            named = amount % 8
            before = next((b.remaining_minor for b in book.buckets if b.id == named), 0)
            posting = book.debit(amount, first={named})
            if amount and before:
                assert posting.allocations[0] == Allocation(named, -min(amount, before))
        elif op == "credit":
            posting = book.credit(amount, NewBucket("refund", 30))
        else:
            candidates = [b.id for b in book.buckets]
            found = book.expire(candidates[amount % len(candidates)]) if candidates else None
            if found is None:
                continue
            posting = found
        assert posting.balance_before_minor == balance  # postings chain
        balance = posting.balance_after_minor
        assert sum(b.remaining_minor for b in book.buckets) == max(balance, 0)
        assert all(b.remaining_minor >= 0 for b in book.buckets)
