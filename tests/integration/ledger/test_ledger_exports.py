"""Finance exports (ledger/exports.py, `meterline export`): the Parquet files read back with pyarrow and sum to
the ledger; balances roll forward from the opening balance; transaction rows carry their chain hash."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from ledger import service
from ledger.checkpoints import apply_checkpoint
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel

pytestmark = pytest.mark.integration
PRICE = PriceModel(model="per_unit", unit_price_minor=Decimal("0.4"))


def _postings(engine: Engine, project: str, ref: str, *, as_of: int) -> str:
    with engine.begin() as conn:
        wallet = service.ensure_wallet(conn, project_id=project, owner_kind="subject", owner_ref=ref).id
        service.grant_credits(conn, wallet_id=wallet, amount_minor=1_000, idempotency_key=f"g:{ref}:{as_of}")
        service.debit(conn, wallet_id=wallet, amount_minor=37, idempotency_key=f"d:{ref}:{as_of}")
        apply_checkpoint(conn, ChargeCheckpoint(
            source_topic=f"usage-{project}", partition=0, as_of_offset=as_of, emitted_at=datetime.now(UTC),
            counters=[CounterValue(key=CounterKey(wallet_id=wallet, project_id=project, meter_id=m,
                                                  period_start=datetime(2026, 12, 1, tzinfo=UTC),
                                                  price_version_id="v1"),
                                   units=Decimal(u) + as_of, price=PRICE, events=3) for m, u in (("tok", "101.5"),
                                                                                                ("img", "9"))]))
    return wallet


def _run(args: list[str]) -> str:
    from meterline.cli import app

    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_parquet_exports_read_back_and_sum_to_the_ledger(engine: Engine, tmp_path: Path, stack_env: dict[str, str],
                                                        clear_settings_caches: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in stack_env.items():
        monkeypatch.setenv(key, value)
    a = _postings(engine, "p1", "alice", as_of=1)
    _postings(engine, "p2", "zed", as_of=1)
    time.sleep(0.05)
    with engine.connect() as conn:
        middle = conn.execute(text("SELECT now()")).scalar_one()
        opening = {w: b for w, b in conn.execute(text("SELECT wallet_id, balance_after_minor FROM transactions t "
                                                      "WHERE id = (SELECT max(id) FROM transactions u "
                                                      "WHERE u.wallet_id = t.wallet_id)"))}
    time.sleep(0.05)
    _postings(engine, "p1", "alice", as_of=2)
    b = _postings(engine, "p1", "bob", as_of=3)
    since, until = (datetime.now(UTC) - timedelta(hours=1)).isoformat(), (datetime.now(UTC) + timedelta(hours=1))

    out = tmp_path / "tx.parquet"
    _run(["transactions", "--from", since[:19], "--to", until.isoformat()[:19], "--format", "parquet",
          "--project", "p1", "-o", str(out), "--batch", "100"])
    table = pq.read_table(out)
    with engine.connect() as conn:
        ledger = conn.execute(text("SELECT count(*), sum(amount_minor) FROM transactions WHERE project_id = 'p1'")).one()
        hashes = dict(conn.execute(text("SELECT id, encode(chain_hash, 'hex') FROM transactions")).all())
        balances = dict(conn.execute(text("SELECT id, balance_minor FROM wallets WHERE project_id = 'p1'")).all())
        charged = conn.execute(text("SELECT sum(charged_minor) FROM usage_charges WHERE project_id = 'p1'")).scalar()
        everything = conn.execute(text("SELECT count(*) FROM transactions")).scalar_one()
    assert (table.num_rows, pc.sum(table["amount_minor"]).as_py()) == (ledger[0], ledger[1])
    assert set(table["project_id"].to_pylist()) == {"p1"}
    assert dict(zip(table["id"].to_pylist(), table["chain_hash"].to_pylist(), strict=True)) == \
        {i: h for i, h in hashes.items() if i in set(table["id"].to_pylist())}
    assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"

    _run(["balances", "--from", middle.isoformat(), "--to", until.isoformat(), "--format", "parquet",
          "--project", "p1", "-o", str(tmp_path / "b.parquet")])
    rolled = {r["wallet_id"]: r for r in pq.read_table(tmp_path / "b.parquet").to_pylist()}
    assert {w: r["closing_minor"] for w, r in rolled.items()} == balances
    assert rolled[a]["opening_minor"] == opening[a] and rolled[b]["opening_minor"] == 0
    assert all(r["opening_minor"] + r["credits_minor"] + r["debits_minor"] == r["closing_minor"]
               for r in rolled.values())

    _run(["usage", "--from", "2026-12-01", "--to", "2027-01-01", "--format", "parquet", "--project", "p1",
          "-o", str(tmp_path / "u.parquet")])
    usage = pq.read_table(tmp_path / "u.parquet")
    assert pc.sum(usage["charged_minor"]).as_py() == charged and usage.num_rows == 4
    assert sorted(Decimal(u) for u in usage["units"].to_pylist()) == [Decimal(11), Decimal(12), Decimal("103.5"),
                                                                       Decimal("104.5")]

    lines = list(csv.DictReader(io.StringIO(_run(["transactions", "--from", since[:19], "--to",
                                                  until.isoformat()[:19], "-o", "-"]))))
    assert len(lines) == everything and {r["project_id"] for r in lines} == {"p1", "p2"}
    assert sum(int(r["amount_minor"]) for r in lines if r["project_id"] == "p1") == ledger[1]
