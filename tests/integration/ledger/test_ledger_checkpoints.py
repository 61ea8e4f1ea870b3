"""apply_checkpoint against a real PostgreSQL: DESIGN §2.2 literally, stale offsets, cross-partition merge,
debt, credit-backs, dedupe keys and the seeding snapshot."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from ledger import queries, service
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel, PriceTier
from ledger.errors import WalletBlocked

pytestmark = pytest.mark.integration

TOPIC = "usage.events.v1"
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PER_TOKEN = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))


def _value(wallet: str, units: str, *, price: PriceModel = PER_TOKEN, meter: str = "tokens", version: str = "v3",
           aggregation: str = "sum", latest_at: datetime | None = None, events: int = 1) -> CounterValue:
    return CounterValue(key=CounterKey(wallet_id=wallet, project_id="p1", meter_id=meter, period_start=PERIOD,
                                       price_version_id=version),
                        units=Decimal(units), price=price, aggregation=aggregation,  # type: ignore[arg-type]
                        latest_at=latest_at, events=events)


def _checkpoint(partition: int, as_of: int, *values: CounterValue, dedupe: list[int] | None = None) -> ChargeCheckpoint:
    return ChargeCheckpoint(source_topic=TOPIC, partition=partition, as_of_offset=as_of, counters=list(values),
                            dedupe_keys=dedupe or [], emitted_at=datetime.now(UTC))


def _apply(engine: Engine, checkpoint: ChargeCheckpoint) -> str:
    with engine.begin() as conn:
        return service.apply_checkpoint(conn, checkpoint).status


def _usage_amounts(engine: Engine, wallet: str) -> list[int]:
    with engine.connect() as conn:
        items = queries.list_transactions(conn, wallet_id=wallet, kinds=["usage"]).items
    return [t.amount_minor for t in reversed(items)]


def _balance(engine: Engine, wallet: str) -> int:
    with engine.connect() as conn:
        view = queries.get_balance(conn, wallet)
    assert view is not None
    return view.balance_minor


def test_design_worked_example(engine: Engine, invariants: Callable[[], None]) -> None:
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="alice", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=100, idempotency_key="g")
        conn.execute(text("INSERT INTO applied_offsets (source_topic, partition, applied_through) VALUES (:t, 5, 99)"),
                     {"t": TOPIC})
    assert _apply(engine, _checkpoint(5, 140, _value("W", "90"))) == "applied"
    assert _usage_amounts(engine, "W") == [-36]
    assert _apply(engine, _checkpoint(5, 140, _value("W", "90"))) == "stale"  # redelivered: no-op
    assert _apply(engine, _checkpoint(5, 160, _value("W", "93"))) == "applied"
    assert _usage_amounts(engine, "W") == [-36, -1]  # 37 − 36: the 0.2 stays in the cumulative
    with engine.connect() as conn:
        snap = queries.partition_snapshot(conn, TOPIC, [5, 6])
        charge = conn.execute(text("SELECT units, charged_minor FROM usage_charges")).one()
        key = conn.execute(text("SELECT idempotency_key FROM transactions WHERE kind = 'usage' ORDER BY id")).scalars().all()
    assert snap.applied_through == {5: 160, 6: -1}
    assert [(c.partition, c.units, c.charged_minor) for c in snap.counters] == [(5, Decimal(93), 37)]
    assert tuple(charge) == (Decimal(93), 37)
    assert key[0] == f"usage:{TOPIC}:5:140:W:tokens:{PERIOD.isoformat()}:v3"
    assert _balance(engine, "W") == 63
    invariants()


def test_stale_and_older_checkpoints_change_nothing(engine: Engine, invariants: Callable[[], None]) -> None:
    assert _apply(engine, _checkpoint(0, 50, _value("S", "10"))) == "applied"
    assert _apply(engine, _checkpoint(0, 40, _value("S", "999"))) == "stale"
    assert _apply(engine, _checkpoint(0, 50, _value("S", "999"))) == "stale"
    assert _usage_amounts(engine, "S") == [-4]
    with engine.connect() as conn:
        snap = queries.partition_snapshot(conn, TOPIC, [0])
        wallet = queries.get_wallet(conn, "S")
    assert [c.units for c in snap.counters] == [Decimal(10)] and snap.applied_through == {0: 50}
    assert wallet is not None and (wallet.owner_kind, wallet.owner_ref) == ("subject", "S")  # auto-provisioned
    invariants()


def test_two_partitions_of_one_key_are_priced_as_a_whole(engine: Engine, invariants: Callable[[], None]) -> None:
    graduated = PriceModel(model="graduated", tiers=(
        PriceTier(up_to=Decimal(100), unit_price_minor=Decimal(2)),
        PriceTier(up_to=Decimal(200), unit_price_minor=Decimal(1)),
        PriceTier(unit_price_minor=Decimal("0.5"))))

    def price(units: int) -> int:  # independent: the tiers written out
        return 2 * min(units, 100) + max(min(units, 200) - 100, 0) + (max(units - 200, 0) // 2)

    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="x", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=10_000, idempotency_key="g")
    _apply(engine, _checkpoint(0, 10, _value("W", "80", price=graduated)))     # total 80
    _apply(engine, _checkpoint(1, 7, _value("W", "70", price=graduated)))      # total 150: crosses 100
    _apply(engine, _checkpoint(0, 20, _value("W", "130", price=graduated)))    # total 200: boundary
    _apply(engine, _checkpoint(1, 9, _value("W", "121", price=graduated)))     # total 251
    assert _usage_amounts(engine, "W") == [-price(80), -(price(150) - price(80)), -(price(200) - price(150)),
                                           -(price(251) - price(200))]
    assert -sum(_usage_amounts(engine, "W")) == price(251) == 325
    # per-partition prices summed would be price(130) + price(121) = 260 + 242: merging matters
    assert price(130) + price(121) != price(251)
    invariants()


def test_usage_beyond_the_balance_is_debt_then_a_grant_settles_it(engine: Engine, invariants: Callable[[], None]) -> None:
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref="D", wallet_id="D")
        service.grant_credits(conn, wallet_id="D", amount_minor=10, idempotency_key="g")
    _apply(engine, _checkpoint(2, 1, _value("D", "100")))  # 40 credits of usage, 10 available
    assert _balance(engine, "D") == -30
    with engine.connect() as conn:
        view = queries.get_balance(conn, "D")
    assert view is not None and view.blocked and view.debt_minor == 30
    with engine.begin() as conn, pytest.raises(WalletBlocked):
        service.debit(conn, wallet_id="D", amount_minor=1, idempotency_key="d")
    with engine.begin() as conn:
        grant = service.grant_credits(conn, wallet_id="D", amount_minor=50, idempotency_key="g2").transaction
    assert grant.allocations[0].bucket_id is None and grant.allocations[0].amount_minor == 30
    assert _balance(engine, "D") == 20
    with engine.begin() as conn:
        assert service.debit(conn, wallet_id="D", amount_minor=20, idempotency_key="d").outcome == "created"
    invariants()


def test_a_cheaper_volume_tier_posts_a_credit_back(engine: Engine, invariants: Callable[[], None]) -> None:
    volume = PriceModel(model="volume", tiers=(PriceTier(up_to=Decimal(100), unit_price_minor=Decimal(1)),
                                               PriceTier(unit_price_minor=Decimal("0.5"))))
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref="V", wallet_id="V")
        service.grant_credits(conn, wallet_id="V", amount_minor=200, idempotency_key="g")
    _apply(engine, _checkpoint(0, 1, _value("V", "100", price=volume)))
    _apply(engine, _checkpoint(0, 2, _value("V", "101", price=volume)))  # 101 × 0.5 = 50: credit back 50
    assert _usage_amounts(engine, "V") == [-100, 50]
    assert _balance(engine, "V") == 150
    with engine.connect() as conn:
        credit = queries.list_transactions(conn, wallet_id="V", kinds=["usage"]).items[0]
    assert credit.allocations[0].bucket_source == "refund" and credit.allocations[0].amount_minor == 50
    invariants()


def test_max_and_latest_merge_across_partitions(engine: Engine, invariants: Callable[[], None]) -> None:
    one = PriceModel(model="per_unit", unit_price_minor=Decimal(1))
    t1, t2 = datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)
    _apply(engine, _checkpoint(0, 1, _value("M", "30", price=one, meter="peak", aggregation="max"),
                               _value("M", "12", price=one, meter="seats", aggregation="latest", latest_at=t2)))
    _apply(engine, _checkpoint(1, 1, _value("M", "20", price=one, meter="peak", aggregation="max"),
                               _value("M", "40", price=one, meter="seats", aggregation="latest", latest_at=t1)))
    with engine.connect() as conn:
        charges = dict(conn.execute(text("SELECT meter_id, charged_minor FROM usage_charges")).all())
    assert charges == {"peak": 30, "seats": 12}  # max(30, 20); the value seen at t2 > t1
    assert _balance(engine, "M") == -42
    invariants()


def test_dedupe_keys_are_recorded_with_the_checkpoint(engine: Engine) -> None:
    _apply(engine, _checkpoint(3, 5, _value("K", "1"), dedupe=[1, -2, 2**63 - 1]))
    assert _apply(engine, _checkpoint(3, 5, dedupe=[7])) == "stale"
    _apply(engine, _checkpoint(3, 6, dedupe=[8]))  # a checkpoint may carry only dedupe keys
    with engine.connect() as conn:
        seen = queries.dedupe_keys_since(conn, source_topic=TOPIC, partitions=[3, 4], since=datetime(2000, 1, 1, tzinfo=UTC))
        applied = queries.applied_offsets(conn, TOPIC, [3, 4])
    assert seen == {3: {1, -2, 2**63 - 1, 8}, 4: set()}
    assert applied == {3: 6, 4: -1}


def test_a_big_checkpoint_posts_every_key_once(engine: Engine, invariants: Callable[[], None]) -> None:
    values = [_value(f"w{i:04d}", str(i + 1), meter=m) for i in range(300) for m in ("a", "b")]
    _apply(engine, _checkpoint(0, 1, *values))
    with engine.connect() as conn:
        total, count = conn.execute(text("SELECT sum(amount_minor), count(*) FROM transactions WHERE kind = 'usage'")).one()
    expected = [int(Decimal(i + 1) * Decimal("0.4")) for i in range(300) for _ in range(2)]
    assert count == sum(1 for e in expected if e) and -total == sum(expected)
    invariants()


def _state(engine: Engine, topic: str, wallets: list[str]) -> tuple[object, ...]:
    with engine.connect() as conn:
        counters = conn.execute(text(
            "SELECT wallet_id, meter_id, partition, units, events, latest_at FROM usage_counters "
            "WHERE source_topic = :t ORDER BY 1, 2, 3"), {"t": topic}).all()
        charges = conn.execute(text(
            "SELECT wallet_id, meter_id, units, charged_minor FROM usage_charges WHERE wallet_id = ANY(:w) "
            "ORDER BY 1, 2"), {"w": wallets}).all()
        balances = [queries.get_balance(conn, w).balance_minor for w in wallets]  # type: ignore[union-attr]
        applied = queries.applied_offsets(conn, topic, [0])
        dedupe = queries.dedupe_keys_since(conn, source_topic=topic, partitions=[0],
                                           since=datetime(2000, 1, 1, tzinfo=UTC))
    return ([(w[-1], *rest) for w, *rest in counters], [(w[-1], *rest) for w, *rest in charges], balances,
            applied, dedupe)


def test_merged_checkpoints_leave_exactly_what_one_by_one_application_leaves(
        engine: Engine, invariants: Callable[[], None]) -> None:
    """apply_checkpoints (the consumer's merge of a fetched backlog) vs apply_checkpoint one at a time, on
    the same arrival sequence: duplicates, an older zombie checkpoint, a falling LATEST gauge, a cheaper
    volume tier, dedupe keys. Counters, charges, balances, applied marks and dedupe keys must be equal."""
    from ledger.checkpoints import apply_checkpoints

    volume = PriceModel(model="volume", tiers=(PriceTier(up_to=Decimal(100), unit_price_minor=Decimal(1)),
                                               PriceTier(unit_price_minor=Decimal("0.5"))))
    one = PriceModel(model="per_unit", unit_price_minor=Decimal(1))
    t1, t2 = datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)

    def sequence(topic: str, p: str) -> list[ChargeCheckpoint]:
        def cp(as_of: int, *values: CounterValue, dedupe: list[int] | None = None) -> ChargeCheckpoint:
            return ChargeCheckpoint(source_topic=topic, partition=0, as_of_offset=as_of, counters=list(values),
                                    dedupe_keys=dedupe or [], emitted_at=datetime.now(UTC))
        return [
            cp(10, _value(f"{p}A", "90"), _value(f"{p}B", "60", price=volume), dedupe=[1, 2]),
            cp(10, _value(f"{p}A", "90")),                                    # redelivered: stale
            cp(20, _value(f"{p}A", "93"), _value(f"{p}G", "12", price=one, meter="seats", aggregation="latest",
                                                   latest_at=t1), dedupe=[3]),
            cp(15, _value(f"{p}A", "999"), dedupe=[99]),                       # older (zombie): stale
            cp(30, _value(f"{p}B", "101", price=volume), _value(f"{p}G", "5", price=one, meter="seats",
                                                                 aggregation="latest", latest_at=t2)),
            cp(31, dedupe=[4]),                                                # only dedupe keys
            cp(40, _value(f"{p}A", "100"), _value(f"{p}C", "25"), dedupe=[5, 6]),
        ]

    wallets = {p: [f"{p}A", f"{p}B", f"{p}C", f"{p}G"] for p in ("x", "y")}
    with engine.begin() as conn:
        for p in ("x", "y"):
            for w in wallets[p]:
                service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref=w, wallet_id=w)
                service.grant_credits(conn, wallet_id=w, amount_minor=100, idempotency_key=f"g{w}")
        for topic in ("one.by.one", "merged"):  # both start from an applied mark
            conn.execute(text("INSERT INTO applied_offsets (source_topic, partition, applied_through) "
                              "VALUES (:t, 0, 5)"), {"t": topic})
    statuses = [_apply(engine, c) for c in sequence("one.by.one", "x")]
    assert statuses == ["applied", "stale", "applied", "stale", "applied", "applied", "applied"]
    with engine.begin() as conn:
        merged = apply_checkpoints(conn, sequence("merged", "y"))
    assert (merged.applied, merged.stale, merged.outcome.status, merged.outcome.applied_through) == (5, 2, "applied", 40)
    assert _state(engine, "one.by.one", wallets["x"]) == _state(engine, "merged", wallets["y"])
    # one posting per key instead of one per checkpoint, named by the merged (last) offset
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT idempotency_key FROM transactions WHERE kind = 'usage' AND wallet_id LIKE 'y%' "
                                 "ORDER BY id")).scalars().all()
    assert len(keys) == 4 and all(k.startswith("usage:merged:0:40:") for k in keys)
    # a fully stale batch changes nothing
    with engine.begin() as conn:
        again = apply_checkpoints(conn, sequence("merged", "y"))
    assert (again.applied, again.stale, again.outcome.status) == (0, 7, "stale")
    assert _state(engine, "one.by.one", wallets["x"]) == _state(engine, "merged", wallets["y"])
    invariants()


# -- price versions continue the period (DESIGN §2 invariant 9, issue 13 item 4) ------------------------------

def _versioned(wallet: str, units: str, version: str, effective_from: datetime, *, price: PriceModel,
               meter_version: int = 1) -> CounterValue:
    return _value(wallet, units, price=price, version=version).model_copy(
        update={"price_effective_from": effective_from, "meter_version": meter_version})


def test_a_new_price_version_continues_the_allowance_also_across_partitions_and_late_events(
        engine: Engine, invariants: Callable[[], None]) -> None:
    free_1000 = PriceModel(model="per_unit", unit_price_minor=Decimal(1), free_units=Decimal(1000))
    v1_from, v2_from = datetime(2020, 1, 1, tzinfo=UTC), datetime(2026, 11, 10, tzinfo=UTC)
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="x", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=10_000, idempotency_key="g")
    # the repro: 900 tokens under v1, 900 under v2 (1,000 free in both) — was 0 charged, is 800
    _apply(engine, _checkpoint(0, 10, _versioned("W", "900", "pv1", v1_from, price=free_1000)))
    _apply(engine, _checkpoint(0, 20, _versioned("W", "900", "pv2", v2_from, price=free_1000)))
    assert -sum(_usage_amounts(engine, "W")) == 800
    # another partition (another subject of the wallet) adds 300 under v2: v2 continues at 1,800
    _apply(engine, _checkpoint(1, 5, _versioned("W", "300", "pv2", v2_from, price=free_1000)))
    assert -sum(_usage_amounts(engine, "W")) == 1_100
    # a late event of v1's time (50 more under v1): v1 stays free (950), v2's slice starts at 950 now
    _apply(engine, _checkpoint(1, 6, _versioned("W", "50", "pv1", v1_from, price=free_1000)))
    assert -sum(_usage_amounts(engine, "W")) == 1_150 == (950 + 1_200) - 1_000
    # a new meter counting version is its own run: it does not continue the old definition's units
    _apply(engine, _checkpoint(0, 30, _versioned("W", "900", "pv2@m2", v2_from, price=free_1000, meter_version=2)))
    assert -sum(_usage_amounts(engine, "W")) == 1_150
    with engine.connect() as conn:
        charged = dict(conn.execute(text("SELECT price_version_id, charged_minor FROM usage_charges "
                                         "WHERE wallet_id = 'W'")).all())
    assert charged == {"pv1": 0, "pv2": 1_150, "pv2@m2": 0}
    invariants()


def test_counters_without_an_effective_time_are_priced_on_their_own(engine: Engine,
                                                                    invariants: Callable[[], None]) -> None:
    """Older producers (no price_effective_from) and rows written before ledger_0006: history stays as it was."""
    free_1000 = PriceModel(model="per_unit", unit_price_minor=Decimal(1), free_units=Decimal(1000))
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="x", wallet_id="W")
    _apply(engine, _checkpoint(0, 10, _value("W", "900", price=free_1000, version="pv1")))
    _apply(engine, _checkpoint(0, 20, _value("W", "1100", price=free_1000, version="pv2")))
    assert -sum(_usage_amounts(engine, "W")) == 100
    invariants()


def test_a_key_stored_without_an_effective_time_keeps_its_charge_when_a_producer_starts_sending_one(
        engine: Engine, invariants: Callable[[], None]) -> None:
    """A key written before ledger_0006 (no price_effective_from) and named again by a newer producer (with one):
    the stored row is priced alone from what it was charged — not taken for a new group member charged nothing
    (which would charge its whole usage again)."""
    one = PriceModel(model="per_unit", unit_price_minor=Decimal(1))
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="x", wallet_id="W")
    _apply(engine, _checkpoint(0, 10, _value("W", "900", price=one, version="pv1")))
    _apply(engine, _checkpoint(0, 20, _versioned("W", "1100", "pv1", datetime(2020, 1, 1, tzinfo=UTC), price=one)))
    assert -sum(_usage_amounts(engine, "W")) == 1_100
    with engine.connect() as conn:
        row = conn.execute(text("SELECT charged_minor, posted_minor, price_effective_from FROM usage_charges "
                                "WHERE wallet_id = 'W'")).one()
    assert tuple(row) == (1_100, 1_100, None)
    invariants()


def test_two_partitions_applying_two_versions_of_one_group_concurrently_end_exact(
        engine: Engine, invariants: Callable[[], None]) -> None:
    """The group lock: partition 0 keeps adding units under v1 (late events), partition 1 under v2, both at
    once. Whatever the interleaving, the final charges are the continued price of the final units."""
    import threading

    from ledger.pricing import continued_prices_minor

    graduated = PriceModel(model="graduated", free_units=Decimal(50), tiers=(
        PriceTier(up_to=Decimal(300), unit_price_minor=Decimal(3)), PriceTier(unit_price_minor=Decimal(1))))
    v1_from, v2_from = datetime(2020, 1, 1, tzinfo=UTC), datetime(2026, 11, 10, tzinfo=UTC)
    with engine.begin() as conn:
        for wallet in ("W1", "W2"):
            service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref=wallet, wallet_id=wallet)
    rounds = 25
    errors: list[BaseException] = []

    def run(partition: int, version: str, effective_from: datetime) -> None:
        try:
            for i in range(1, rounds + 1):
                values = [_versioned(w, str(i * 7), version, effective_from, price=graduated) for w in ("W1", "W2")]
                _apply(engine, _checkpoint(partition, i, *values))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(0, "pv1", v1_from)),
               threading.Thread(target=run, args=(1, "pv2", v2_from))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    expected = continued_prices_minor([(graduated, "sum", Decimal(rounds * 7))] * 2)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT wallet_id, price_version_id, charged_minor FROM usage_charges "
                                 "ORDER BY 1, 2")).all()
    assert [(w, v, c) for w, v, c in rows] == [("W1", "pv1", expected[0]), ("W1", "pv2", expected[1]),
                                               ("W2", "pv1", expected[0]), ("W2", "pv2", expected[1])]
    for wallet in ("W1", "W2"):
        assert -sum(_usage_amounts(engine, wallet)) == sum(expected)
    invariants()


def test_a_correction_without_an_effective_time_is_still_priced_with_its_group(
        engine: Engine, invariants: Callable[[], None]) -> None:
    """A replay correction (ledger/corrections.py) names a key without ``price_effective_from``: its stored row
    is grouped, so it is priced with its group — otherwise it would undo the continuation of the later version."""
    from ledger.corrections import apply_correction

    free_1000 = PriceModel(model="per_unit", unit_price_minor=Decimal(1), free_units=Decimal(1000))
    v1_from, v2_from = datetime(2020, 1, 1, tzinfo=UTC), datetime(2026, 11, 10, tzinfo=UTC)
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="x", wallet_id="W")
    _apply(engine, _checkpoint(0, 10, _versioned("W", "900", "pv1", v1_from, price=free_1000)))
    _apply(engine, _checkpoint(0, 20, _versioned("W", "900", "pv2", v2_from, price=free_1000)))
    assert -sum(_usage_amounts(engine, "W")) == 800
    with engine.begin() as conn:  # the log had 50 more units under v1 than the ledger counted
        apply_correction(conn, source_id=TOPIC, replay_id="r1",
                         counters=[_value("W", "50", price=free_1000, version="pv1")])
    with engine.connect() as conn:
        charged = dict(conn.execute(text("SELECT price_version_id, charged_minor FROM usage_charges "
                                         "WHERE wallet_id = 'W'")).all())
    assert charged == {"pv1": 0, "pv2": 850}  # v2 now starts at 950: 850 of its 900 units are charged
    assert _balance(engine, "W") == -850
    invariants()


# -- several partitions in one transaction (the consumer's combined apply) --------------------------------------

def test_partitions_applied_together_leave_exactly_what_applying_each_alone_leaves(
        engine: Engine, invariants: Callable[[], None]) -> None:
    """apply_partitions (small checkpoints of several partitions in ONE pass) vs each partition's checkpoints
    applied alone, on the same input: a key named by two partitions (priced once over both), a partition whose
    checkpoints are all stale, a fenced zombie, a merged backlog, dedupe keys and a wallet of another project.
    Counters, charges, balances, applied marks, dedupe keys and refusals must be equal; the outcomes per
    partition too, except that the shared key posts once."""
    from ledger.checkpoints import apply_checkpoints, apply_partitions

    volume = PriceModel(model="volume", tiers=(PriceTier(up_to=Decimal(100), unit_price_minor=Decimal(1)),
                                               PriceTier(unit_price_minor=Decimal("0.5"))))

    def value(wallet: str, units: str, **kw: object) -> CounterValue:
        return _value(wallet, units, **kw)  # type: ignore[arg-type]

    def inputs(topic: str, p: str) -> list[list[ChargeCheckpoint]]:
        def cp(partition: int, as_of: int, *values: CounterValue, dedupe: list[int] | None = None,
               epoch: int = 0) -> ChargeCheckpoint:
            return ChargeCheckpoint(source_topic=topic, partition=partition, as_of_offset=as_of,
                                    counters=list(values), dedupe_keys=dedupe or [], emitted_at=datetime.now(UTC),
                                    owner_epoch=epoch)
        return [
            [cp(0, 10, value(f"{p}A", "90"), value(f"{p}S", "30"), dedupe=[1, 2]),
             cp(0, 12, value(f"{p}A", "95"), value(f"{p}B", "150", price=volume), dedupe=[3])],   # a backlog
            [cp(1, 7, value(f"{p}S", "20"), value(f"{p}C", "25"), dedupe=[4])],                  # S also in 0
            [cp(2, 3, value(f"{p}D", "999"))],                                                   # stale: mark 5
            [cp(3, 9, value(f"{p}E", "10"), epoch=1)],                                           # fenced: epoch 2
            [cp(4, 4, value(f"{p}F", "10"), _value(f"{p}X", "10"))],                             # X: project p2
        ]

    wallets = {p: [f"{p}{w}" for w in "ABCDEFS"] for p in ("x", "y")}
    with engine.begin() as conn:
        for p in ("x", "y"):
            for w in wallets[p]:
                service.ensure_wallet(conn, project_id="p1", owner_kind="subject", owner_ref=w, wallet_id=w)
                service.grant_credits(conn, wallet_id=w, amount_minor=100, idempotency_key=f"g{w}")
            service.ensure_wallet(conn, project_id="p2", owner_kind="subject", owner_ref=f"{p}X", wallet_id=f"{p}X")
        for topic in ("alone", "together"):
            conn.execute(text("INSERT INTO applied_offsets (source_topic, partition, applied_through, owner_epoch) "
                              "VALUES (:t, 2, 5, 0), (:t, 3, -1, 2)"), {"t": topic})

    alone = []
    for checkpoints in inputs("alone", "x"):
        with engine.begin() as conn:
            alone.append(apply_checkpoints(conn, checkpoints))
    with engine.begin() as conn:
        together = apply_partitions(conn, inputs("together", "y"))

    def comparable(outcomes: list[object]) -> list[tuple[object, ...]]:
        return [(m.applied, m.stale, m.fenced, m.refused, m.outcome.status, m.outcome.partition,  # type: ignore[attr-defined]
                 m.outcome.applied_through) for m in outcomes]  # type: ignore[attr-defined]

    assert comparable(together) == comparable(alone) == [
        (2, 0, 0, 0, "applied", 0, 12), (1, 0, 0, 0, "applied", 1, 7), (0, 1, 0, 0, "stale", 2, 5),
        (0, 0, 1, 0, "stale", 3, -1), (1, 0, 0, 1, "applied", 4, 4)]
    # the shared key S posts once (named after partition 0), not once per partition; the money is the same
    assert sum(m.outcome.transactions for m in alone) == sum(m.outcome.transactions for m in together) + 1
    assert sum(m.outcome.charged_minor for m in alone) == sum(m.outcome.charged_minor for m in together)

    def state(topic: str, p: str) -> tuple[object, ...]:
        with engine.connect() as conn:
            counters = conn.execute(text(
                "SELECT wallet_id, partition, units, events, as_of_offset FROM usage_counters WHERE source_topic = :t "
                "ORDER BY 1, 2"), {"t": topic}).all()
            charges = conn.execute(text(
                "SELECT wallet_id, units, charged_minor FROM usage_charges WHERE wallet_id = ANY(:w) ORDER BY 1"),
                {"w": wallets[p]}).all()
            balances = [queries.get_balance(conn, w).balance_minor for w in wallets[p]]  # type: ignore[union-attr]
            applied = queries.applied_offsets(conn, topic, [0, 1, 2, 3, 4])
            dedupe = queries.dedupe_keys_since(conn, source_topic=topic, partitions=[0, 1, 2, 3, 4],
                                               since=datetime(2000, 1, 1, tzinfo=UTC))
            refused = conn.execute(text("SELECT partition, as_of_offset, wallet_id FROM refused_counters "
                                        "WHERE source_topic = :t"), {"t": topic}).all()
        return ([(w[1:], *rest) for w, *rest in counters], [(w[1:], *rest) for w, *rest in charges], balances,
                applied, dedupe, [(pt, o, w[1:]) for pt, o, w in refused])

    assert state("alone", "x") == state("together", "y")
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT idempotency_key FROM transactions WHERE kind = 'usage' AND wallet_id = 'yS'"
                                 )).scalars().all()
    assert keys == [f"usage:together:0:12:yS:tokens:{PERIOD.isoformat()}:v3"]
    # applied again together: every partition stale, nothing changes
    with engine.begin() as conn:
        again = apply_partitions(conn, inputs("together", "y"))
    assert [m.outcome.status for m in again] == ["stale"] * 5
    assert state("alone", "x") == state("together", "y")
    invariants()


def test_apply_partitions_refuses_a_partition_named_twice(engine: Engine) -> None:
    from ledger.checkpoints import apply_partitions

    with engine.begin() as conn, pytest.raises(ValueError, match="once"):
        apply_partitions(conn, [[_checkpoint(0, 1, _value("W", "1"))], [_checkpoint(0, 2, _value("W", "2"))]])


def test_a_lock_first_application_and_a_waiting_settle_pass_do_not_deadlock(
        engine: Engine, invariants: Callable[[], None]) -> None:
    """An application with a key sent without ``price_effective_from`` locks its charge rows before pricing, and also
    rewrites the other price versions of its keys' groups. Those rows were locked only by the update, after its own
    keys — out of key order — while a settle pass that waits for locked keys (the expiry job's) locks a wallet's rows
    in key order: each could hold a row the other wanted (PostgreSQL aborted the applier: deadlock detected). They
    are now locked with the application's keys, in one ordered statement."""
    import threading
    import time

    from ledger.checkpoints import apply_checkpoints
    from ledger.db import make_engine
    from ledger.settle import settle_usage

    one = PriceModel(model="per_unit", unit_price_minor=Decimal(1))
    v1_from, v2_from = datetime(2020, 1, 1, tzinfo=UTC), datetime(2026, 11, 10, tzinfo=UTC)
    with engine.begin() as conn:
        service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref="W", wallet_id="W")
        service.grant_credits(conn, wallet_id="W", amount_minor=10_000, idempotency_key="g-W")

    def apply_later(checkpoint: ChargeCheckpoint) -> str:
        with engine.begin() as conn:
            return apply_checkpoints(conn, [checkpoint], settle_later=True).outcome.status

    # one group, two price versions: "va" from partition 0, "vb" from partition 1, both left to settle
    assert apply_later(_checkpoint(0, 1, _versioned("W", "100", "va", v1_from, price=one))) == "applied"
    assert apply_later(_checkpoint(1, 1, _versioned("W", "10", "vb", v2_from, price=one))) == "applied"
    # partition 1 again, with a key of another meter sent without an effective time: the lock-first path
    lock_first = _checkpoint(1, 2, _versioned("W", "20", "vb", v2_from, price=one),
                             _value("W", "5", price=one, meter="zz"))

    watcher = make_engine(str(engine.url.render_as_string(hide_password=False)), pool_size=1)
    errors: list[BaseException] = []

    def apply() -> None:
        try:
            assert apply_later(lock_first) == "applied"
        except BaseException as exc:  # reported below
            errors.append(exc)

    with engine.connect() as settler:
        settler.begin()
        # a settle pass that has locked the wallet's first key (key order) when the applier starts
        settler.execute(text("SELECT 1 FROM usage_charges WHERE wallet_id = 'W' AND price_version_id = 'va' "
                             "FOR UPDATE"))
        applier = threading.Thread(target=apply)
        applier.start()
        deadline, waiting = time.monotonic() + 20, 0
        with watcher.connect() as watch:
            while not waiting and time.monotonic() < deadline:
                time.sleep(0.05)
                watch.execute(text("SELECT pg_stat_clear_snapshot()"))
                waiting = watch.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                    "current_database()")).scalar_one()
        assert waiting == 1  # the applier waits for the key the pass holds
        outcome = settle_usage(settler, wallet_ids=["W"])  # the rest of the pass: waits for what the applier holds
        settler.commit()
    applier.join(60)
    watcher.dispose()
    assert not applier.is_alive()
    assert errors == []
    assert (outcome.keys, outcome.amount_minor) == (2, 110)
    with engine.begin() as conn:
        settle_usage(conn)
    # va 100 units, then vb 20 units continue the run (per unit, no allowance): 100 + 20, and zz 5
    assert -sum(_usage_amounts(engine, "W")) == 125
    invariants()
