"""The tenant boundary on the payments path (DESIGN §2 invariant 7, issue 13 item 1): a subject key that names
another project's wallet (a row written before the API checked subject keys) is refused by ``resolve_wallet``
instead of crediting that wallet."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from tenancy_testkit import api_client, owner_and_project, sql

from api.payments.effects import Ctx, Unmatched, resolve_wallet
from ledger.db import make_engine

pytestmark = pytest.mark.integration


def test_resolve_wallet_refuses_a_subject_key_naming_another_projects_wallet(database_url: str,
                                                                           engines: Any) -> None:
    with api_client(database_url, engines) as client:
        a_headers, a = owner_and_project(client, "A")
        _, b = owner_and_project(client, "B")
        a_wallet = client.post(f"/api/v1/projects/{a}/wallets", json={"owner_kind": "project"},
                               headers=a_headers).json()["id"]
    # a legacy row: written before set_subject_key checked the wallet's project
    sql(database_url, "INSERT INTO subject_keys (project_id, subject, wallet_id) VALUES (%s, 'cust-1', %s)",
        b, a_wallet)
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            ctx = Ctx(conn=conn, project_id=b, provider="stripe", event_id="evt_1", event_type="checkout",
                      at=datetime.now(UTC))
            with pytest.raises(Unmatched):
                resolve_wallet(ctx, "cust-1")
            with pytest.raises(Unmatched):  # the wallet id itself, too (this check existed before)
                resolve_wallet(ctx, a_wallet)
    finally:
        engine.dispose()
