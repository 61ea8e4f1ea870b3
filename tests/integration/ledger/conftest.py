"""Fixtures for the ledger's integration tests: an engine on the test's own migrated database."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, text

from ledger.chain import verify
from ledger.db import make_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=5)
    yield eng
    eng.dispose()


@pytest.fixture
def invariants(engine: Engine) -> Callable[..., None]:
    """Call at the end of a test: the ledger-wide invariants, computed straight from the tables.
    ``outbox_purged=True`` when the test purged published outbox rows on purpose."""
    return lambda outbox_purged=False: _ledger_invariants_hold(engine, outbox_purged=outbox_purged)


def _ledger_invariants_hold(eng: Engine, *, outbox_purged: bool) -> None:
    """Assert the ledger-wide invariants every test ends in (computed straight from the tables)."""
    with eng.connect() as conn:
        # a positive balance is exactly the credit left in buckets; a negative one means empty buckets
        broken = conn.execute(text("""
            SELECT w.id, w.balance_minor, coalesce(sum(b.remaining_minor), 0) AS in_buckets
            FROM wallets w LEFT JOIN credit_buckets b ON b.wallet_id = w.id
            GROUP BY w.id HAVING coalesce(sum(b.remaining_minor), 0) <> greatest(w.balance_minor, 0)
        """)).all()
        assert broken == [], broken
        # the balance is the sum of the transactions, and the transactions chain
        drift = conn.execute(text("""
            SELECT w.id FROM wallets w LEFT JOIN transactions t ON t.wallet_id = w.id
            GROUP BY w.id HAVING coalesce(sum(t.amount_minor), 0) <> w.balance_minor
        """)).all()
        assert drift == [], drift
        unchained = conn.execute(text("""
            SELECT id FROM (SELECT id, balance_before_minor,
                                   lag(balance_after_minor, 1, 0::bigint) OVER (PARTITION BY wallet_id ORDER BY id) AS prev
                            FROM transactions) t WHERE balance_before_minor <> prev
        """)).all()
        assert unchained == [], unchained
        # allocations sum to their transaction's amount
        unbalanced = conn.execute(text("""
            SELECT t.id FROM transactions t LEFT JOIN transaction_allocations a ON a.transaction_id = t.id
            GROUP BY t.id HAVING coalesce(sum(a.amount_minor), 0) <> t.amount_minor
        """)).all()
        assert unbalanced == [], unbalanced
        # what is left to settle is the wallet's unsettled usage, and each key's postings add up to its posted part
        unsettled = conn.execute(text("""
            SELECT w.id FROM wallets w LEFT JOIN usage_charges c ON c.wallet_id = w.id
            GROUP BY w.id HAVING coalesce(sum(c.charged_minor - c.posted_minor), 0) <> w.unsettled_minor
        """)).all()
        assert unsettled == [], unsettled
        misposted = conn.execute(text("""
            SELECT c.wallet_id, c.meter_id, c.posted_minor, -coalesce(sum(t.amount_minor), 0) AS in_transactions
            FROM usage_charges c LEFT JOIN transactions t
              ON t.wallet_id = c.wallet_id AND t.meter_id = c.meter_id AND t.period_start = c.period_start
             AND t.price_version_id = c.price_version_id
            GROUP BY c.wallet_id, c.meter_id, c.period_start, c.price_version_id, c.posted_minor
            HAVING -coalesce(sum(t.amount_minor), 0) <> c.posted_minor
        """)).all()
        assert misposted == [], misposted
        # held = sum of active holds
        held = conn.execute(text("""
            SELECT w.id FROM wallets w LEFT JOIN holds h ON h.wallet_id = w.id AND h.status = 'active'
            GROUP BY w.id HAVING coalesce(sum(h.amount_minor), 0) <> w.held_minor
        """)).all()
        assert held == [], held
        # one outbox row per transaction, naming it
        outbox, distinct, transactions = conn.execute(text("""
            SELECT count(*), count(DISTINCT convert_from(payload, 'UTF8')::jsonb ->> 'transaction_id'),
                   (SELECT count(*) FROM transactions) FROM outbox""")).one()
        assert outbox == distinct
        assert outbox <= transactions if outbox_purged else outbox == transactions
        # every wallet's hash chain recomputes (ledger/chain.py), whichever paths posted
        report = verify(conn)
        assert report.ok, report.breaks
