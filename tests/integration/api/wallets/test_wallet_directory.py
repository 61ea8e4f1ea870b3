"""The wallet list the dashboard stands on: owner email, subject (auto-provisioned too), balance, search and
paging; a wallet's holds. Real PostgreSQL through the real app."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tenancy_testkit import api_client, five_users, money, team

from ledger.checkpoints import _ENSURE_WALLETS
from ledger.db import make_engine
from streams.catalog_model import auto_wallet_id

pytestmark = pytest.mark.integration


def _auto_provision(database_url: str, project_id: str, subject: str) -> str:
    """Create the wallet exactly as the ledger does for an unknown subject's usage (it knows only the id)."""
    wallet_id = auto_wallet_id(project_id, subject)
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(_ENSURE_WALLETS, {"rows": json.dumps([{"id": wallet_id, "project_id": project_id}])})
    finally:
        engine.dispose()
    return wallet_id


def _items(client: Any, base: str, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    r = client.get(base, params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_wallet_list_names_owners_and_subjects_searches_and_pages(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"].headers
        base = f"/api/v1/projects/{t.project_id}/wallets"
        member = client.post(base, json={"owner_kind": "user", "owner_ref": users["member"].user_id},
                             headers=owner).json()["id"]
        named = client.post(base, json={"owner_kind": "subject", "owner_ref": "customer-882"}, headers=owner).json()["id"]
        keyed = _auto_provision(database_url, t.project_id, "zulu@shop")
        r = client.put(f"/api/v1/projects/{t.project_id}/subject-keys/zulu@shop", json={}, headers=owner)
        assert r.status_code == 200 and r.json()["wallet_id"] == keyed, r.text
        anonymous = _auto_provision(database_url, t.project_id, "never-keyed")
        assert money(client, f"{base}/{named}/grants", {"amount_minor": 700}, owner).status_code == 201

        page = _items(client, base, users["viewer"].headers)
        by_id = {w["id"]: w for w in page["items"]}
        assert by_id[member]["owner_email"] == users["member"].email and by_id[member]["subject"] is None
        assert by_id[named]["subject"] == "customer-882" and not by_id[named]["auto_provisioned"]
        assert by_id[named]["balance"]["balance_minor"] == 700
        assert by_id[keyed]["subject"] == "zulu@shop" and by_id[keyed]["auto_provisioned"]
        # no subject key and no usage of it in analytics: listed, subject unknown
        assert by_id[anonymous]["subject"] is None and by_id[anonymous]["auto_provisioned"]

        assert [w["id"] for w in _items(client, base, owner, q="ZULU@")["items"]] == [keyed]
        assert [w["id"] for w in _items(client, base, owner, q=users["member"].email[:10])["items"]] == [member]
        assert [w["id"] for w in _items(client, base, owner, q="customer-88")["items"]] == [named]
        assert [w["id"] for w in _items(client, base, owner, q=named[:12])["items"]] == [named]
        assert _items(client, base, owner, q="100%_")["items"] == []  # LIKE wildcards are literal

        seen: list[str] = []
        cursor = None
        while True:
            got = _items(client, base, owner, limit=2, **({"cursor": cursor} if cursor else {}))
            assert len(got["items"]) <= 2
            seen += [w["id"] for w in got["items"]]
            cursor = got["next_cursor"]
            if cursor is None:
                break
        assert seen == [w["id"] for w in page["items"]] and len(seen) == 4


def test_wallet_reservations_are_listed_newest_first(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"].headers
        base = f"/api/v1/projects/{t.project_id}/wallets"
        wallet = client.post(base, json={"owner_kind": "project"}, headers=owner).json()["id"]
        assert money(client, f"{base}/{wallet}/grants", {"amount_minor": 500}, owner).status_code == 201
        first = money(client, f"{base}/{wallet}/reservations", {"amount_minor": 100}, owner).json()["hold"]["id"]
        second = money(client, f"{base}/{wallet}/reservations", {"amount_minor": 50}, owner).json()["hold"]["id"]
        assert money(client, f"{base}/{wallet}/reservations/{first}/void", None, owner).status_code == 200
        holds = client.get(f"{base}/{wallet}/reservations", headers=users["viewer"].headers).json()
        assert [(h["id"], h["status"], h["amount_minor"]) for h in holds] == [
            (second, "active", 50), (first, "voided", 100)]
        active = client.get(f"{base}/{wallet}/reservations", params={"status": "active"}, headers=owner).json()
        assert [h["id"] for h in active] == [second]
        assert client.get(f"{base}/nope/reservations", headers=owner).status_code == 404
