"""The verifiable ledger (ledger_0010, ledger/chain.py): every posting path chains each wallet's transactions in
its own statement, the Python payload equals the database's, concurrent postings still chain, and a row altered
directly in PostgreSQL by a superuser with triggers disabled is named by verify (and by `meterline ledger verify`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from ledger import service
from ledger.chain import chain_heads, link, payload_of, verify
from ledger.checkpoints import apply_checkpoint
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.staged import BatchedDebit, DebitBatch, raw_connection

pytestmark = pytest.mark.integration
PER_TOKEN = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))
PERIOD = datetime(2026, 12, 1, tzinfo=UTC)


def _wallet(engine: Engine, ref: str, credits: int) -> str:
    with engine.begin() as conn:
        wallet = service.ensure_wallet(conn, project_id="p1", owner_kind="user", owner_ref=ref)
        service.grant_credits(conn, wallet_id=wallet.id, amount_minor=credits, idempotency_key=f"seed:{ref}",
                              metadata={"note": 'quote " back\\slash\nnewline \x01 ünï €', "n": [1, 2.5]})
    return wallet.id


def _every_path(engine: Engine) -> tuple[str, str]:
    """Postings through the set-based writer (grants, refunds, adjustments, a multi-key checkpoint: several rows of
    one wallet in one INSERT), the pipelined hot path (debit, commit) and a group-committed batch."""
    a, b = _wallet(engine, "alice", 10_000), _wallet(engine, "bob", 500)
    with engine.begin() as conn:
        first = service.debit(conn, wallet_id=a, amount_minor=30, idempotency_key="d1", metadata={"k": "v"})
        hold = service.reserve(conn, wallet_id=a, amount_minor=50, timeout_s=60, idempotency_key="r1")
        service.commit_hold(conn, hold_id=hold.id, amount_minor=40, idempotency_key="c1")
        service.refund(conn, transaction_id=first.transaction.id, idempotency_key="rf1", amount_minor=10,
                       reason="goodwill")
        service.adjust(conn, wallet_id=b, amount_minor=-700, reason="chargeback", idempotency_key="adj1")
    values = [CounterValue(key=CounterKey(wallet_id=a, project_id="p1", meter_id=m, period_start=PERIOD,
                                          price_version_id="v1"), units=Decimal(u), price=PER_TOKEN, events=1)
              for m, u in (("tokens", "100"), ("images", "35"), ("calls", "7"))]
    with engine.begin() as conn:
        apply_checkpoint(conn, ChargeCheckpoint(source_topic="usage", partition=0, as_of_offset=5, counters=values,
                                                emitted_at=datetime.now(UTC)))
    with engine.connect() as conn:
        raw = raw_connection(conn)
        batch = DebitBatch([BatchedDebit(a, f"b{i}", 3 + i) for i in range(4)])
        (lock_sql, lock_params), (context_sql, context_params) = batch.reads
        batch.load(raw.execute(lock_sql, lock_params).fetchall(), raw.execute(context_sql, context_params).fetchone())
        for i in range(4):
            batch.post(BatchedDebit(a, f"b{i}", 3 + i))
        write = batch.write()
        assert write is not None
        raw.execute(*write)
        conn.commit()
    return a, b


def test_every_posting_path_chains_and_python_rebuilds_the_databases_payload(
        engine: Engine, invariants: Callable[[], None]) -> None:
    _every_path(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT t.*, t.metadata::text AS metadata_text, ledger_chain_payload(t) AS db_payload
            FROM transactions t ORDER BY wallet_id, id""")).all()
        report = verify(conn)
    assert len(rows) == 13 and report.ok and (report.wallets, report.transactions) == (2, 13), report.breaks
    previous: dict[str, bytes] = {}
    for row in rows:
        assert payload_of(row) == row.db_payload.encode()
        assert bytes(row.chain_hash) == link(previous.get(row.wallet_id), payload_of(row))
        previous[row.wallet_id] = bytes(row.chain_hash)
    invariants()


def test_concurrent_postings_on_one_wallet_chain_in_id_order(engine: Engine) -> None:
    wallet = _wallet(engine, "hot", 1_000_000)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(15):
                with engine.begin() as conn:
                    if i % 3 == 0:
                        service.grant_credits(conn, wallet_id=wallet, amount_minor=5, idempotency_key=f"g{n}-{i}")
                    else:
                        service.debit(conn, wallet_id=wallet, amount_minor=7, idempotency_key=f"d{n}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with engine.connect() as conn:
        report = verify(conn)
    assert report.ok and report.transactions == 61, report.breaks


def test_a_row_altered_by_a_superuser_with_triggers_off_is_named_by_verify(
        engine: Engine, stack_env: dict[str, str], clear_settings_caches: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = _every_path(engine)
    with engine.connect() as conn:
        victim, after = conn.execute(text("SELECT id, (SELECT min(id) FROM transactions WHERE wallet_id = :w AND "
                                          "id > t.id) FROM transactions t WHERE wallet_id = :w AND kind = 'debit' "
                                          "ORDER BY id LIMIT 1"), {"w": a}).one()
        assert verify(conn).ok
    with engine.begin() as conn:  # the append-only trigger is off for this session: only a superuser can do this
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("UPDATE transactions SET metadata = '{\"k\": \"w\"}' WHERE id = :id"), {"id": victim})
    with engine.connect() as conn:
        report = verify(conn)
        project_b = verify(conn, project_id="p1")
    assert [(x.wallet_id, x.transaction_id) for x in report.breaks] == [(a, victim)]
    assert "chain hash" in report.breaks[0].problem and project_b.breaks == report.breaks

    with engine.begin() as conn:  # a cover-up: also rewrite the altered row's own link → the next link breaks
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        # (chain v2, ledger_0013: the row's metadata commitment too, else verify names the row itself)
        conn.execute(text("UPDATE transactions SET metadata_commitment = sha256(metadata_salt || "
                          "convert_to(metadata::text, 'UTF8')) WHERE id = :id"), {"id": victim})
        conn.execute(text("""
            UPDATE transactions t SET chain_hash = sha256(
                (SELECT chain_hash FROM transactions p WHERE p.wallet_id = t.wallet_id AND p.id < t.id
                 ORDER BY p.id DESC LIMIT 1) || convert_to(ledger_chain_payload(t), 'UTF8'))
            WHERE id = :id"""), {"id": victim})
        conn.execute(text("UPDATE transactions SET amount_minor = amount_minor - 1, "
                          "balance_after_minor = balance_after_minor - 1 WHERE id = :id"), {"id": after})
    with engine.connect() as conn:
        report = verify(conn)
    named = {(x.transaction_id, x.problem.split(":")[0].split(" (")[0]) for x in report.breaks}
    assert (after, "chain hash does not match the row") in named  # the link after the cover-up is broken
    assert any("balance does not chain" in x.problem for x in report.breaks)  # the row after `after`

    for key, value in stack_env.items():
        monkeypatch.setenv(key, value)
    from meterline.cli import app

    result = CliRunner().invoke(app, ["ledger", "verify", "--project", "p1"])
    assert result.exit_code == 1 and str(after) in result.stdout, result.output


def test_chain_heads_per_day_pin_each_wallets_last_link(engine: Engine) -> None:
    _every_path(engine)
    today = datetime.now(UTC).date()
    with engine.connect() as conn:
        days = chain_heads(conn, project_id="p1", since=today - timedelta(days=1), until=today + timedelta(days=1))
        last = dict(conn.execute(text("SELECT DISTINCT ON (wallet_id) wallet_id, encode(chain_hash, 'hex') "
                                      "FROM transactions ORDER BY wallet_id, id DESC")).all())
        none = chain_heads(conn, project_id="p1", since=date(2020, 1, 1), until=date(2020, 1, 2))
    assert [d.day for d in days] == [today] and none == []
    assert {h.wallet_id: h.chain_hash for h in days[0].heads} == last
    assert len(days[0].digest) == 64
