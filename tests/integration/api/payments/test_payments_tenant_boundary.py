"""A payment event cannot credit another project's wallet (issue 13 item 1, "resolve_wallet has the same gap"):
a subject key of project B mapped to a wallet of project A is refused as unmatched, and the composite key of
api_0009 would refuse the row anyway. On cbf7ba4 ``resolve_wallet`` returned A's wallet for B's event."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from api.payments.effects import Ctx, Unmatched, resolve_wallet
from ledger import service
from ledger.db import make_engine


def test_a_subject_key_mapped_across_projects_does_not_resolve(database_url: str) -> None:
    engine: Engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            victim = service.ensure_wallet(conn, project_id="A", owner_kind="user", owner_ref="alice").id
            # the mapping streams' catalog should refuse (the streams side of issue 13), written as it was possible
            conn.execute(text("INSERT INTO subject_keys (project_id, subject, wallet_id) VALUES ('B', 'cust-1', :w)"),
                         {"w": victim})
            ctx = Ctx(conn=conn, project_id="B", provider="stripe", event_id="evt_1", event_type="checkout",
                      at=datetime.now(UTC))
            with pytest.raises(Unmatched, match="another project"):
                resolve_wallet(ctx, "cust-1")
            with pytest.raises(Unmatched, match="another project"):
                resolve_wallet(ctx, victim)  # naming the wallet id directly was already refused
    finally:
        engine.dispose()
