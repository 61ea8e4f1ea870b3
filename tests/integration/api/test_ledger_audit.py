"""Ledger audit routes: chain heads per day (api/routes/ledger_chain.py)."""

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
