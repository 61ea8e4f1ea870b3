"""The tenant is part of every key (DESIGN §2 invariant 7, issue 13 item 1): a checkpoint cannot move money in
another project's wallet, and the schema refuses any project's row that names another project's wallet.

On cbf7ba4 the checkpoint test charged project A's wallet with project B's usage, and every insert below
succeeded (single-column foreign keys, or none)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy import Engine, text

from ledger import queries, service
from ledger.checkpoints import apply_checkpoint, apply_partitions
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.db import libpq_url
from ledger.known_wallets import KnownWallets

pytestmark = pytest.mark.integration

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("1"))


def _counter(wallet: str, project: str, units: int) -> CounterValue:
    return CounterValue(key=CounterKey(wallet_id=wallet, project_id=project, meter_id="tokens", period_start=PERIOD,
                                       price_version_id="v1"), units=Decimal(units), price=PRICE, events=units)


def test_a_counter_naming_another_projects_wallet_is_refused_and_kept(engine: Engine,
                                                                     invariants: Callable[..., None]) -> None:
    with engine.begin() as conn:
        victim = service.ensure_wallet(conn, project_id="A", owner_kind="user", owner_ref="alice").id
        service.grant_credits(conn, wallet_id=victim, amount_minor=1_000, idempotency_key="topup-a")
    checkpoint = ChargeCheckpoint(
        source_topic="usage.events.v1", partition=0, as_of_offset=41, emitted_at=datetime.now(UTC),
        counters=[_counter(victim, "B", 300),        # project B's usage mapped to project A's wallet
                  _counter("b-own", "B", 7)],        # B's own subject wallet: charged as usual
        dedupe_keys=[11, 12])
    with engine.begin() as conn:
        outcome = apply_checkpoint(conn, checkpoint)
    assert outcome.status == "applied"
    with engine.connect() as conn:
        assert queries.get_balance(conn, victim).balance_minor == 1_000  # type: ignore[union-attr]
        assert queries.get_balance(conn, "b-own").balance_minor == -7  # type: ignore[union-attr]
        assert queries.get_wallet(conn, "b-own").project_id == "B"  # type: ignore[union-attr]
        [refused] = queries.refused_counters(conn, project_id="B")
        assert (refused.reason, refused.wallet_id, refused.wallet_project_id, refused.units, refused.as_of_offset) \
            == ("wallet_in_other_project", victim, "A", Decimal(300), 41)
        assert queries.applied_offsets(conn, "usage.events.v1", [0]) == {0: 41}  # the partition goes on
        assert conn.execute(text("SELECT count(*) FROM usage_counters WHERE wallet_id = :w"),
                            {"w": victim}).scalar() == 0
    with engine.begin() as conn:  # a redelivery is stale; the refusal is recorded once
        assert apply_checkpoint(conn, checkpoint).status == "stale"
        assert len(queries.refused_counters(conn)) == 1
    invariants()


def test_wallets_the_consumer_knows_skip_step_2_but_another_projects_wallet_is_refused_every_time(
        engine: Engine, invariants: Callable[..., None]) -> None:
    """The consumer's KnownWallets (ledger/known_wallets.py) skips creating wallets it has seen committed. A wallet
    the application itself created is not known until a later application finds it; a wallet of another project is
    never known, so its counters are refused on every checkpoint, not only the first."""
    with engine.begin() as conn:
        victim = service.ensure_wallet(conn, project_id="A", owner_kind="user", owner_ref="alice").id
        service.grant_credits(conn, wallet_id=victim, amount_minor=1_000, idempotency_key="topup-a")
    known = KnownWallets()

    def apply(as_of: int, units: int) -> None:
        checkpoint = ChargeCheckpoint(
            source_topic="usage.events.v1", partition=0, as_of_offset=as_of, emitted_at=datetime.now(UTC),
            counters=[_counter(victim, "B", units), _counter("b-own", "B", units)], dedupe_keys=[as_of])
        with engine.begin() as conn:
            [merged] = apply_partitions(conn, [[checkpoint]], known_wallets=known)
        assert merged.refused == 1  # the victim's counter, every time

    apply(41, 3)  # creates b-own: not known yet (it exists only if this transaction commits)
    assert known.unknown([("b-own", "B")]) == [("b-own", "B")]
    apply(42, 5)  # b-own found committed: known from now on; the victim's wallet never is
    assert known.unknown([("b-own", "B"), (victim, "B")]) == [(victim, "B")]
    apply(43, 9)  # step 2 skips b-own and still refuses the victim's counter
    with engine.connect() as conn:
        assert queries.get_balance(conn, victim).balance_minor == 1_000  # type: ignore[union-attr]
        assert queries.get_balance(conn, "b-own").balance_minor == -9  # type: ignore[union-attr]
        assert sorted(r.as_of_offset for r in queries.refused_counters(conn, project_id="B")) == [41, 42, 43]
    invariants()


def test_known_wallets_are_bounded() -> None:
    known = KnownWallets(pairs_max=3)
    known.add([("a", "p"), ("b", "p"), ("c", "p")])
    assert known.unknown([("a", "p"), ("d", "p")]) == [("d", "p")]
    known.add([("d", "p")])  # past the bound the set starts over
    assert known.unknown([("a", "p"), ("d", "p")]) == [("a", "p")]
    known.clear()
    assert len(known) == 0


#: every table of a project's object that names a wallet and must carry the project with it
COMPOSITE_WALLET_KEYS = ("credit_buckets", "transactions", "holds", "usage_charges", "checkout_sessions",
                         "entitlements", "payments", "signup_bonus_grants", "wallet_erasures")


def test_the_schema_refuses_a_project_row_naming_another_projects_wallet(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        keys = dict(conn.execute("""
            SELECT c.conrelid::regclass::text,
                   array_agg(a.attname ORDER BY k.n) || ARRAY['->', c.confrelid::regclass::text]
            FROM pg_constraint c
            CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)
            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
            WHERE c.contype = 'f' AND c.confrelid = 'wallets'::regclass
            GROUP BY c.oid, c.conrelid, c.confrelid
        """).fetchall())
        for table in COMPOSITE_WALLET_KEYS:
            assert keys.get(table) == ["project_id", "wallet_id", "->", "wallets"], (table, keys.get(table))
        # and they bite: project B's rows naming project A's wallet
        conn.execute("INSERT INTO wallets (id, project_id, owner_kind, owner_ref) VALUES ('wa', 'A', 'user', 'a')")
        conn.execute("INSERT INTO users (id, email, password_hash) VALUES ('u1', 'u1@example.com', 'x')")
        conn.execute("INSERT INTO projects (id, name, owner_user_id) VALUES ('B', 'B', 'u1')")
        for statement in (
            "INSERT INTO credit_buckets (wallet_id, project_id, source, priority, granted_minor, remaining_minor) "
            "VALUES ('wa', 'B', 'top_up', 100, 5, 5)",
            "INSERT INTO transactions (project_id, wallet_id, kind, amount_minor, balance_before_minor, "
            "balance_after_minor, idempotency_key) VALUES ('B', 'wa', 'top_up', 5, 0, 5, 'k1')",
            "INSERT INTO holds (id, wallet_id, project_id, amount_minor, expires_at, idempotency_key) "
            "VALUES ('h1', 'wa', 'B', 5, now(), 'k2')",
            "INSERT INTO usage_charges (wallet_id, project_id, meter_id, period_start, price_version_id, aggregation, "
            "price) VALUES ('wa', 'B', 'm', now(), 'v', 'sum', '{}')",
            "INSERT INTO signup_bonus_grants (project_id, wallet_id, granted_minor, reason, country_source) "
            "VALUES ('B', 'wa', 0, 'not_configured', 'none')",
        ):
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.execute(statement)
