"""The tenant boundary around subject keys (DESIGN §2 invariant 7, issue 13 item 1): a project's subject keys can
never point at another project's wallet. Over HTTP with two real projects: project B maps a subject to project A's
wallet (an existing one, and the guessable auto-provisioned id of one of A's future subjects) → 404, nothing
stored."""

from __future__ import annotations

from typing import Any

import pytest
from tenancy_testkit import api_client, owner_and_project, sql

from streams.catalog_model import auto_wallet_id

pytestmark = pytest.mark.integration




def test_a_subject_key_cannot_name_another_projects_wallet(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        a_headers, a = owner_and_project(client, "A")
        b_headers, b = owner_and_project(client, "B")
        r = client.post(f"/api/v1/projects/{a}/wallets", json={"owner_kind": "subject", "owner_ref": "alice"},
                        headers=a_headers)
        assert r.status_code == 201, r.text
        a_wallet = r.json()["id"]

        # A's existing wallet, and the auto-provisioned id of a subject A has not used yet (uuid5: guessable)
        for wallet_id in (a_wallet, auto_wallet_id(a, "bob")):
            r = client.put(f"/api/v1/projects/{b}/subject-keys/mallory", json={"wallet_id": wallet_id},
                           headers=b_headers)
            assert r.status_code == 404, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "catalog.wallet_not_found"
        assert client.get(f"/api/v1/projects/{b}/subject-keys", headers=b_headers).json() == []
        assert sql(database_url, "SELECT count(*) FROM subject_keys WHERE project_id = %s", b) == [(0,)]

        # what stays allowed: B's own wallet, B's own subject default, a new wallet name B creates
        r = client.post(f"/api/v1/projects/{b}/wallets", json={"owner_kind": "project"}, headers=b_headers)
        b_wallet = r.json()["id"]
        assert client.put(f"/api/v1/projects/{b}/subject-keys/carol", json={"wallet_id": b_wallet},
                          headers=b_headers).status_code == 200
        assert client.put(f"/api/v1/projects/{b}/subject-keys/dave", json={},
                          headers=b_headers).json()["wallet_id"] == auto_wallet_id(b, "dave")
        assert client.put(f"/api/v1/projects/{b}/subject-keys/erin", json={"wallet_id": "w-erin"},
                          headers=b_headers).status_code == 200
