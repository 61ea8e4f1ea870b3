"""Ledger audit routes: chain heads per day (api/wallets/routes_ledger_chain.py) and finance exports (api/wallets/routes_exports.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tenancy_testkit import api_client, money, owner_and_project, sql


def _funded_wallet(client: Any, headers: dict[str, str], project: str, ref: str, amount: int) -> str:
    r = client.post(f"/api/v1/projects/{project}/wallets", json={"owner_kind": "subject", "owner_ref": ref},
                    headers=headers)
    assert r.status_code == 201, r.text
    wallet = str(r.json()["id"])
    r = money(client, f"/api/v1/projects/{project}/wallets/{wallet}/grants", {"amount_minor": amount}, headers)
    assert r.status_code == 201, r.text
    return wallet


def test_chain_heads_publish_each_wallets_last_link_of_the_day(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        headers, project = owner_and_project(client)
        other_headers, other = owner_and_project(client, "Other")
        a = _funded_wallet(client, headers, project, "a", 100)
        b = _funded_wallet(client, headers, project, "b", 50)
        _funded_wallet(client, other_headers, other, "x", 10)
        assert money(client, f"/api/v1/projects/{project}/wallets/{a}/debit", {"amount_minor": 7},
                     headers).status_code == 201
        r = client.get(f"/api/v1/projects/{project}/ledger/chain-heads", headers=headers)
        assert r.status_code == 200, r.text
        (day,) = r.json()["days"]
        assert day["day"] == datetime.now(UTC).date().isoformat() and len(day["digest"]) == 64
        last = {w: h for w, h in sql(database_url, "SELECT DISTINCT ON (wallet_id) wallet_id, encode(chain_hash, "
                                                   "'hex') FROM transactions ORDER BY wallet_id, id DESC")}
        assert {h["wallet_id"]: h["chain_hash"] for h in day["heads"]} == {a: last[a], b: last[b]}
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        assert client.get(f"/api/v1/projects/{project}/ledger/chain-heads?from={tomorrow}",
                          headers=headers).status_code == 422
        assert client.get(f"/api/v1/projects/{other}/ledger/chain-heads", headers=headers).status_code == 404


def test_admins_download_exports_that_read_back_and_sum_to_the_ledger(database_url: str, engines: Any) -> None:
    import io

    import pyarrow.parquet as pq

    with api_client(database_url, engines) as client:
        headers, project = owner_and_project(client)
        other_headers, other = owner_and_project(client, "Other")
        a = _funded_wallet(client, headers, project, "a", 100)
        _funded_wallet(client, headers, project, "b", 50)
        _funded_wallet(client, other_headers, other, "x", 10)
        assert money(client, f"/api/v1/projects/{project}/wallets/{a}/debit", {"amount_minor": 7},
                     headers).status_code == 201
        day = datetime.now(UTC).date()
        query = f"from={day.isoformat()}&to={(day + timedelta(days=1)).isoformat()}"
        r = client.get(f"/api/v1/projects/{project}/exports/transactions?{query}&format=parquet", headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/vnd.apache.parquet"
        table = pq.read_table(io.BytesIO(r.content))
        (count, total), = sql(database_url, "SELECT count(*), sum(amount_minor) FROM transactions WHERE project_id = %s",
                              project)
        assert (table.num_rows, sum(table["amount_minor"].to_pylist())) == (count, total) == (3, 143)
        hashes = dict(sql(database_url, "SELECT id, encode(chain_hash, 'hex') FROM transactions"))
        assert all(hashes[i] == h for i, h in zip(table["id"].to_pylist(), table["chain_hash"].to_pylist(),
                                                  strict=True))
        r = client.get(f"/api/v1/projects/{project}/exports/balances?{query}", headers=headers)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        closing = {line.split(",")[1]: int(line.split(",")[7]) for line in r.text.strip().splitlines()[1:]}
        assert closing == {w: b for w, b in sql(database_url, "SELECT id, balance_minor FROM wallets "
                                                              "WHERE project_id = %s", project)}
        bad = client.get(f"/api/v1/projects/{project}/exports/transactions?from={day}&to={day}", headers=headers)
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
        assert client.get(f"/api/v1/projects/{other}/exports/usage?{query}", headers=headers).status_code == 404


def test_the_reconciliation_route_serves_the_latest_report_of_the_project_only(database_url: str,
                                                                               engines: Any) -> None:
    from ledger.db import make_engine
    from ledger.reconciliation import record_report

    with api_client(database_url, engines) as client:
        headers, project = owner_and_project(client)
        r = client.get(f"/api/v1/projects/{project}/reconciliation", headers=headers)
        assert r.status_code == 200 and r.json() == {"report": None}
        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.begin() as conn:
                for drift in (5, 7):
                    record_report(conn, source_topic="usage.events.v1", replay_id=f"rp_{drift}", marks={"0": 9},
                                  started_at=datetime.now(UTC), messages=10, incomplete=[], drift_minor=drift + 1,
                                  differences=[{"project_id": project, "wallet_id": "w1", "meter_id": "m",
                                                "period_start": "2026-12-01T00:00:00+00:00", "amount_minor": drift},
                                               {"project_id": "elsewhere", "wallet_id": "w2", "amount_minor": 1}])
        finally:
            engine.dispose()
        report = client.get(f"/api/v1/projects/{project}/reconciliation", headers=headers).json()["report"]
        assert report["replay_id"] == "rp_7" and report["drift_minor"] == 7 and report["complete"]
        assert [d["wallet_id"] for d in report["differences"]] == ["w1"]
        assert client.get("/healthz").json()["ledger"]["reconciliation"]["ok"] is True

        # a four-record report: a row missing from ClickHouse usage, named with wallet, meter and period
        mismatch = {"project_id": project, "wallet_id": "w1", "meter_id": "m", "period_start": "2026-12-01T00:00:00+00:00",
                    "price_version_id": "pv", "measure": "units", "cut": "ledger mark", "amount_minor": 8,
                    "values": {"usage_log": "30", "ledger": "30", "clickhouse_usage": "10"},
                    "disagreeing": ["clickhouse_usage"]}
        compared = {r: {"compared": True} for r in ("usage_log", "ledger", "clickhouse_usage", "clickhouse_flow")}
        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.begin() as conn:
                record_report(conn, source_topic="usage.events.v1", replay_id="rp_4", marks={"0": 9},
                              started_at=datetime.now(UTC), messages=10, incomplete=[], drift_minor=0, differences=[],
                              coverage=compared, mismatches=[mismatch, {**mismatch, "project_id": "elsewhere"}])
        finally:
            engine.dispose()
        report = client.get(f"/api/v1/projects/{project}/reconciliation", headers=headers).json()["report"]
        assert report["records_compared"] == ["usage_log", "ledger", "clickhouse_usage", "clickhouse_flow"]
        assert report["mismatches"] == [mismatch]
        assert report["drift_wallets"] == [{"wallet_id": "w1", "disagreeing": ["clickhouse_usage"], "keys": 1,
                                            "amount_minor": 8}]
        health = client.get("/healthz").json()
        assert health["status"] == "degraded"
        assert health["ledger"]["reconciliation"]["disagreeing_wallets"] == {"clickhouse_usage": 2}
