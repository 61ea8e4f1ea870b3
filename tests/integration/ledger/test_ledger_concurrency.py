"""No race can overspend (DESIGN §2.4): many threads, separate connections, one wallet."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import text

from ledger import queries, service
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.db import make_engine
from ledger.errors import InsufficientCredits

pytestmark = pytest.mark.integration

THREADS = 16
DEBITS = 1_000


def test_a_thousand_concurrent_debits_never_overspend(database_url: str, invariants: Callable[[], None]) -> None:
    engine = make_engine(database_url, pool_size=THREADS)
    initial = 1_500
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="u", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=initial // 2, idempotency_key="g1")
        service.grant_credits(conn, wallet_id="W", amount_minor=initial // 2, idempotency_key="g2", kind="bonus")
    rng = random.Random(7)
    amounts = [rng.randint(1, 3) for _ in range(DEBITS)]  # sum ≈ 2,000 > 1,500: some must be refused
    lock = threading.Lock()
    succeeded: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with engine.begin() as conn:
                service.debit(conn, wallet_id="W", amount_minor=amounts[i], idempotency_key=f"d{i}")
            with lock:
                succeeded.append(amounts[i])
        except InsufficientCredits:
            with lock:
                refused.append(amounts[i])
        except BaseException as exc:  # anything else is a failure of the test
            with lock:
                errors.append(exc)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(DEBITS), timeout=300))
    assert errors == []
    assert len(succeeded) + len(refused) == DEBITS and refused
    with engine.connect() as conn:
        view = queries.get_balance(conn, "W")
        posted = conn.execute(text("SELECT count(*), -sum(amount_minor) FROM transactions WHERE kind = 'debit'")).one()
        lowest = conn.execute(text("SELECT min(balance_after_minor) FROM transactions")).scalar_one()
    assert view is not None
    assert view.balance_minor == initial - sum(succeeded) >= 0
    assert lowest >= 0  # never below the floor at any point of the history
    assert tuple(posted) == (len(succeeded), sum(succeeded))
    assert view.balance_minor < min(refused)  # each refusal was right when it happened at the end
    engine.dispose()
    invariants()


def test_concurrent_retries_of_one_request_post_once(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=8)
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="u", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=100, idempotency_key="g")

    def attempt(_: int) -> str:
        with engine.begin() as conn:
            return service.debit(conn, wallet_id="W", amount_minor=10, idempotency_key="same").outcome

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(40), timeout=120))
    assert outcomes.count("created") == 1 and outcomes.count("duplicate") == 39
    with engine.connect() as conn:
        assert queries.get_balance(conn, "W").balance_minor == 90  # type: ignore[union-attr]
    engine.dispose()


def test_usage_of_two_partitions_and_debits_on_shared_wallets_do_not_deadlock(
        database_url: str, invariants: Callable[[], None]) -> None:
    """Two appliers (partitions 0 and 1) post to the SAME keys while synchronous debits hit the wallets."""
    engine = make_engine(database_url, pool_size=8)
    wallets = [f"w{i}" for i in range(20)]
    price = PriceModel(model="per_unit", unit_price_minor=Decimal(1))
    period = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        for w in wallets:
            service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref=w, wallet_id=w)
            service.grant_credits(conn, wallet_id=w, amount_minor=10_000, idempotency_key=f"g{w}")
    rounds = 40

    def applier(partition: int) -> None:
        rng = random.Random(partition)
        for offset in range(1, rounds + 1):
            values = [CounterValue(key=CounterKey(wallet_id=w, project_id="p1", meter_id="m", period_start=period,
                                                  price_version_id="v1"),
                                   units=Decimal(offset * 2), price=price, events=offset)
                      for w in rng.sample(wallets, 12)]
            checkpoint = ChargeCheckpoint(source_topic="t", partition=partition, as_of_offset=offset, counters=values,
                                          emitted_at=datetime.now(UTC))
            with engine.begin() as conn:
                service.apply_checkpoint(conn, checkpoint)

    def debitor(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(rounds):
            with engine.begin() as conn:
                service.debit(conn, wallet_id=rng.choice(wallets), amount_minor=1, idempotency_key=f"d{seed}-{i}")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(applier, 0), pool.submit(applier, 1), pool.submit(debitor, 1), pool.submit(debitor, 2)]
        for f in futures:
            f.result(timeout=240)
    with engine.connect() as conn:
        # each key is charged exactly the merged units of its two partitions (price 1/unit)
        mismatched = conn.execute(text("""
            SELECT ch.wallet_id FROM usage_charges ch
            JOIN (SELECT wallet_id, sum(units) AS units FROM usage_counters GROUP BY wallet_id) c USING (wallet_id)
            WHERE ch.charged_minor <> c.units
               OR ch.charged_minor <> (SELECT -sum(amount_minor) FROM transactions t
                                       WHERE t.wallet_id = ch.wallet_id AND t.kind = 'usage')
        """)).all()
    assert mismatched == []
    engine.dispose()
    invariants()
