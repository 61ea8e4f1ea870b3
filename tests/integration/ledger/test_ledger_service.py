"""The ledger's synchronous surface against a real PostgreSQL: grants, debits, idempotency, refunds,
reservations, adjustments, burn order and expiry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from ledger import queries, service
from ledger.errors import (
    HoldNotActive,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    NotRefundable,
    RefundExceedsCharge,
    UnknownTransaction,
    UnknownWallet,
    WalletBlocked,
)

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC)


def _wallet(engine: Engine, *, credits: int = 0, ref: str = "u1") -> str:
    with engine.begin() as conn:
        wallet = service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref=ref)
        if credits:
            service.grant_credits(conn, wallet_id=wallet.id, amount_minor=credits, idempotency_key=f"seed:{ref}")
    return wallet.id


def _balance(engine: Engine, wallet_id: str) -> tuple[int, int, int, int]:
    with engine.connect() as conn:
        b = queries.get_balance(conn, wallet_id)
    assert b is not None
    return b.balance_minor, b.held_minor, b.available_minor, b.debt_minor


def test_ensure_wallet_is_idempotent(engine: Engine) -> None:
    first = _wallet(engine)
    assert _wallet(engine) == first
    with engine.begin() as conn:
        named = service.ensure_wallet(conn, project_id="p1", owner_kind="project", owner_ref="p1", wallet_id="w-p1")
    assert named.id == "w-p1" and named.balance_minor == 0


def test_debit_replay_is_a_duplicate_and_a_changed_replay_conflicts(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=100)
    with engine.begin() as conn:
        first = service.debit(conn, wallet_id=wallet, amount_minor=30, idempotency_key="d1")
    with engine.begin() as conn:
        again = service.debit(conn, wallet_id=wallet, amount_minor=30, idempotency_key="d1")
    assert (first.outcome, again.outcome) == ("created", "duplicate")
    assert again.transaction.id == first.transaction.id and again.transaction.amount_minor == -30
    with engine.begin() as conn, pytest.raises(IdempotencyConflict):
        service.debit(conn, wallet_id=wallet, amount_minor=31, idempotency_key="d1")
    assert _balance(engine, wallet) == (70, 0, 70, 0)
    invariants()


def test_debit_refuses_beyond_available_and_unknown_wallets(engine: Engine) -> None:
    wallet = _wallet(engine, credits=50)
    with engine.begin() as conn, pytest.raises(InsufficientCredits) as exc:
        service.debit(conn, wallet_id=wallet, amount_minor=51, idempotency_key="d")
    assert exc.value.extra["available_minor"] == 50
    with engine.begin() as conn, pytest.raises(UnknownWallet):
        service.debit(conn, wallet_id="nope", amount_minor=1, idempotency_key="d2")
    with engine.begin() as conn, pytest.raises(InvalidRequest):
        service.debit(conn, wallet_id=wallet, amount_minor=0, idempotency_key="d3")
    assert _balance(engine, wallet) == (50, 0, 50, 0)


def test_floor_is_respected(engine: Engine) -> None:
    wallet = _wallet(engine, credits=50)
    with engine.begin() as conn:
        service.set_floor(conn, wallet_id=wallet, floor_minor=20)
    with engine.begin() as conn, pytest.raises(InsufficientCredits):
        service.debit(conn, wallet_id=wallet, amount_minor=31, idempotency_key="d")
    with engine.begin() as conn:
        service.debit(conn, wallet_id=wallet, amount_minor=30, idempotency_key="d")
    assert _balance(engine, wallet) == (20, 0, 0, 0)


def test_burn_order_and_recorded_allocations(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine)
    with engine.begin() as conn:
        paid = service.grant_credits(conn, wallet_id=wallet, amount_minor=100, idempotency_key="g-paid",
                                     kind="top_up").transaction
        late = service.grant_credits(conn, wallet_id=wallet, amount_minor=10, idempotency_key="g-late",
                                     kind="bonus", expires_at=NOW + timedelta(days=30)).transaction
        soon = service.grant_credits(conn, wallet_id=wallet, amount_minor=10, idempotency_key="g-soon",
                                     kind="bonus", expires_at=NOW + timedelta(days=2)).transaction
        promo = service.grant_credits(conn, wallet_id=wallet, amount_minor=5, idempotency_key="g-promo",
                                      kind="promo").transaction
    bucket = {t.idempotency_key: t.allocations[0].bucket_id for t in (paid, late, soon, promo)}
    with engine.begin() as conn:
        spent = service.debit(conn, wallet_id=wallet, amount_minor=30, idempotency_key="d").transaction
    # promo (priority 10) → bonus expiring soonest → bonus expiring later → paid top-up (priority 100)
    assert [(a.bucket_id, a.amount_minor) for a in spent.allocations] == [
        (bucket["g-promo"], -5), (bucket["g-soon"], -10), (bucket["g-late"], -10), (bucket["g-paid"], -5)]
    with engine.connect() as conn:
        listed = queries.list_transactions(conn, wallet_id=wallet, kinds=["debit"]).items
        buckets = queries.list_buckets(conn, wallet)
    assert sorted((a.bucket_id, a.amount_minor) for a in listed[0].allocations) == sorted(
        (a.bucket_id, a.amount_minor) for a in spent.allocations)
    assert [(b.id, b.remaining_minor) for b in buckets] == [(bucket["g-paid"], 95)]
    invariants()


def test_expiry_posts_breakage_for_remainders_only(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine)
    with engine.begin() as conn:
        service.grant_credits(conn, wallet_id=wallet, amount_minor=10, idempotency_key="a", kind="bonus",
                              expires_at=NOW + timedelta(hours=1))
        service.grant_credits(conn, wallet_id=wallet, amount_minor=20, idempotency_key="b", kind="promo",
                              expires_at=NOW + timedelta(hours=2))
        service.grant_credits(conn, wallet_id=wallet, amount_minor=40, idempotency_key="c", kind="top_up")
        service.debit(conn, wallet_id=wallet, amount_minor=25, idempotency_key="d")  # promo 20, then bonus 5
    with engine.begin() as conn:
        assert service.expire_credits(conn, now=NOW + timedelta(minutes=30)) == 0
    with engine.begin() as conn:
        posted = service.expire_credits(conn, now=NOW + timedelta(hours=3))
    assert posted == 1  # the emptied promo bucket is marked expired without a transaction
    with engine.connect() as conn:
        expiries = queries.list_transactions(conn, wallet_id=wallet, kinds=["expiry"]).items
        expired_marks = conn.execute(text("SELECT count(*) FROM credit_buckets WHERE expired_at IS NOT NULL")).scalar()
    assert [t.amount_minor for t in expiries] == [-5]
    assert expired_marks == 2
    with engine.begin() as conn:
        assert service.expire_credits(conn, now=NOW + timedelta(hours=4)) == 0  # once only
    assert _balance(engine, wallet)[0] == 40
    invariants()


def test_refund_twice_with_the_same_key_refunds_once(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=100)
    with engine.begin() as conn:
        charge = service.debit(conn, wallet_id=wallet, amount_minor=40, idempotency_key="d").transaction
    results = []
    for _ in range(2):
        with engine.begin() as conn:
            results.append(service.refund(conn, transaction_id=charge.id, amount_minor=15, idempotency_key="r1",
                                          reason="support"))
    assert [r.outcome for r in results] == ["created", "duplicate"]
    refund = results[0].transaction
    assert refund.kind == "refund" and refund.amount_minor == 15 and refund.related_transaction_id == charge.id
    assert refund.allocations[0].bucket_source == "refund"
    assert _balance(engine, wallet)[0] == 75
    invariants()


def test_refunds_never_exceed_the_charge(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=100)
    with engine.begin() as conn:
        charge = service.debit(conn, wallet_id=wallet, amount_minor=40, idempotency_key="d").transaction
        top_up = queries.list_transactions(conn, wallet_id=wallet, kinds=["top_up"]).items[0]
    with engine.begin() as conn, pytest.raises(RefundExceedsCharge):
        service.refund(conn, transaction_id=charge.id, amount_minor=41, idempotency_key="r0")
    with engine.begin() as conn:
        service.refund(conn, transaction_id=charge.id, amount_minor=25, idempotency_key="r1")
    with engine.begin() as conn, pytest.raises(RefundExceedsCharge) as exc:
        service.refund(conn, transaction_id=charge.id, amount_minor=16, idempotency_key="r2")
    assert exc.value.extra["refundable_minor"] == 15
    with engine.begin() as conn:
        rest = service.refund(conn, transaction_id=charge.id, amount_minor=None, idempotency_key="r3")
    assert rest.transaction.amount_minor == 15
    with engine.begin() as conn, pytest.raises(RefundExceedsCharge):
        service.refund(conn, transaction_id=charge.id, amount_minor=None, idempotency_key="r4")
    with engine.begin() as conn, pytest.raises(NotRefundable):
        service.refund(conn, transaction_id=top_up.id, amount_minor=1, idempotency_key="r5")
    assert _balance(engine, wallet)[0] == 100
    invariants()


def test_reservation_commit_less_than_held_releases_the_rest(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=100)
    with engine.begin() as conn:
        hold = service.reserve(conn, wallet_id=wallet, amount_minor=60, timeout_s=60, idempotency_key="h")
    assert _balance(engine, wallet) == (100, 60, 40, 0)
    with engine.begin() as conn, pytest.raises(InsufficientCredits):
        service.debit(conn, wallet_id=wallet, amount_minor=41, idempotency_key="d")
    with engine.begin() as conn:
        posted = service.commit_hold(conn, hold_id=hold.id, amount_minor=45, idempotency_key="c")
    assert posted.transaction.amount_minor == -45 and posted.transaction.kind == "reservation_commit"
    assert _balance(engine, wallet) == (55, 0, 55, 0)
    with engine.begin() as conn:
        assert service.commit_hold(conn, hold_id=hold.id, amount_minor=45, idempotency_key="c").outcome == "duplicate"
    with engine.begin() as conn, pytest.raises(HoldNotActive):
        service.commit_hold(conn, hold_id=hold.id, amount_minor=45, idempotency_key="c-other")
    invariants()


def test_reservation_commit_more_than_held_charges_only_what_is_available(engine: Engine,
                                                                          invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=100)
    with engine.begin() as conn:
        hold = service.reserve(conn, wallet_id=wallet, amount_minor=60, timeout_s=60, idempotency_key="h1")
        other = service.reserve(conn, wallet_id=wallet, amount_minor=30, timeout_s=60, idempotency_key="h2")
    with engine.begin() as conn:
        posted = service.commit_hold(conn, hold_id=hold.id, amount_minor=80, idempotency_key="c")
    # 60 held + the 10 not held by the other reservation; the other hold's 30 stays untouched
    assert posted.transaction.amount_minor == -70
    assert posted.transaction.metadata == {"requested_minor": 80}
    assert _balance(engine, wallet) == (30, 30, 0, 0)
    with engine.begin() as conn:
        voided = service.void_hold(conn, hold_id=other.id)
        assert service.void_hold(conn, hold_id=other.id).status == "voided"
    assert voided.status == "voided" and _balance(engine, wallet) == (30, 0, 30, 0)
    invariants()


def test_reservations_expire_and_cannot_be_committed_late(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=100)
    with engine.begin() as conn:
        hold = service.reserve(conn, wallet_id=wallet, amount_minor=70, timeout_s=0.2, idempotency_key="h")
        again = service.reserve(conn, wallet_id=wallet, amount_minor=70, timeout_s=0.2, idempotency_key="h")
    assert again.id == hold.id and _balance(engine, wallet)[1] == 70
    with engine.begin() as conn, pytest.raises(IdempotencyConflict):
        service.reserve(conn, wallet_id=wallet, amount_minor=71, timeout_s=1, idempotency_key="h")
    with engine.begin() as conn:
        assert service.expire_holds(conn, now=datetime.now(UTC) - timedelta(seconds=10)) == 0
    import time
    time.sleep(0.3)
    with engine.begin() as conn, pytest.raises(HoldNotActive, match="expired"):
        service.commit_hold(conn, hold_id=hold.id, amount_minor=10, idempotency_key="late")
    with engine.begin() as conn:
        assert service.expire_holds(conn, now=datetime.now(UTC)) == 1
        assert service.expire_holds(conn, now=datetime.now(UTC)) == 0
    with engine.connect() as conn:
        expired = queries.get_hold(conn, hold.id)
    assert expired is not None and expired.status == "expired"
    assert _balance(engine, wallet) == (100, 0, 100, 0)
    invariants()


def test_debt_blocks_access_and_credits_settle_it_first(engine: Engine, invariants: Callable[[], None]) -> None:
    wallet = _wallet(engine, credits=10)
    with engine.begin() as conn:
        adjusted = service.adjust(conn, wallet_id=wallet, amount_minor=-25, reason="chargeback", idempotency_key="a")
    assert adjusted.transaction.reason == "chargeback"
    assert _balance(engine, wallet) == (-15, 0, 0, 15)
    with engine.begin() as conn, pytest.raises(WalletBlocked):
        service.debit(conn, wallet_id=wallet, amount_minor=1, idempotency_key="d")
    with engine.begin() as conn, pytest.raises(WalletBlocked):
        service.reserve(conn, wallet_id=wallet, amount_minor=1, timeout_s=5, idempotency_key="h")
    with engine.begin() as conn:
        grant = service.grant_credits(conn, wallet_id=wallet, amount_minor=40, idempotency_key="g2").transaction
    assert [(a.bucket_id is None, a.amount_minor) for a in grant.allocations] == [(True, 15), (False, 25)]
    assert _balance(engine, wallet) == (25, 0, 25, 0)
    with engine.begin() as conn:
        service.debit(conn, wallet_id=wallet, amount_minor=25, idempotency_key="d")
    with engine.begin() as conn, pytest.raises(InvalidRequest):
        service.adjust(conn, wallet_id=wallet, amount_minor=5, reason=" ", idempotency_key="a2")
    invariants()


def test_a_negative_adjustment_burns_the_named_grant_first(engine: Engine, invariants: Callable[[], None]) -> None:
    """burn_first_of: the named grant's bucket first (not the soon-expiring promo), the rest in burn order, then
    debt; the allocations say which; the preference is part of the request; a foreign grant is refused."""
    wallet, other = _wallet(engine), _wallet(engine, credits=5, ref="u2")
    with engine.begin() as conn:
        promo = service.grant_credits(conn, wallet_id=wallet, amount_minor=200, kind="promo", idempotency_key="pr",
                                      expires_at=NOW + timedelta(days=2)).transaction
        top_up = service.grant_credits(conn, wallet_id=wallet, amount_minor=1000, idempotency_key="tu").transaction
        service.debit(conn, wallet_id=wallet, amount_minor=250, idempotency_key="spend")  # promo 200 + top-up 50
        clawback = service.adjust(conn, wallet_id=wallet, amount_minor=-960, reason="refund", idempotency_key="cb",
                                  burn_first_of=top_up.id)
        again = service.adjust(conn, wallet_id=wallet, amount_minor=-960, reason="refund", idempotency_key="cb",
                               burn_first_of=top_up.id)
    (promo_bucket,), (top_up_bucket,) = ([a.bucket_id for a in t.allocations] for t in (promo, top_up))
    assert [(a.bucket_id, a.amount_minor) for a in clawback.transaction.allocations] == [
        (top_up_bucket, -950), (None, -10)]
    assert again.outcome == "duplicate" and again.transaction.id == clawback.transaction.id
    assert _balance(engine, wallet) == (-10, 0, 0, 10)
    with engine.begin() as conn:
        service.grant_credits(conn, wallet_id=wallet, amount_minor=310, kind="promo", idempotency_key="pr2")
        next_one = service.adjust(conn, wallet_id=wallet, amount_minor=-100, reason="refund", idempotency_key="cb2",
                                  burn_first_of=top_up.id)  # its bucket is empty now: plain burn order
    assert [a.amount_minor for a in next_one.transaction.allocations] == [-100]
    assert next_one.transaction.allocations[0].bucket_id not in (promo_bucket, top_up_bucket)
    with engine.begin() as conn, pytest.raises(IdempotencyConflict):
        service.adjust(conn, wallet_id=wallet, amount_minor=-960, reason="refund", idempotency_key="cb")
    with engine.begin() as conn, pytest.raises(UnknownTransaction):
        service.adjust(conn, wallet_id=other, amount_minor=-1, reason="x", idempotency_key="cb3",
                       burn_first_of=top_up.id)
    with engine.begin() as conn, pytest.raises(InvalidRequest):
        service.adjust(conn, wallet_id=wallet, amount_minor=1, reason="x", idempotency_key="cb4",
                       burn_first_of=top_up.id)
    invariants()


def test_list_transactions_pages_with_a_cursor_and_filters(engine: Engine) -> None:
    wallet = _wallet(engine, credits=1000)
    with engine.begin() as conn:
        for i in range(7):
            service.debit(conn, wallet_id=wallet, amount_minor=i + 1, idempotency_key=f"d{i}",
                          source_ref="order-7" if i == 3 else None)
    seen: list[int] = []
    cursor = None
    with engine.connect() as conn:
        while True:
            page = queries.list_transactions(conn, wallet_id=wallet, cursor=cursor, limit=3)
            seen += [t.amount_minor for t in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        by_ref = queries.list_transactions(conn, wallet_id=wallet, source_ref="order-7").items
        future = queries.list_transactions(conn, wallet_id=wallet, since=datetime.now(UTC) + timedelta(hours=1)).items
        with pytest.raises(ValueError):
            queries.list_transactions(conn, wallet_id=wallet, cursor="garbage!")
    assert seen == [-7, -6, -5, -4, -3, -2, -1, 1000]
    assert [t.amount_minor for t in by_ref] == [-4] and future == ()
