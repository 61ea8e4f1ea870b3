"""Access decisions end to end: checks made over HTTP are recorded in PostgreSQL with their outbox rows, the real
ledger outbox relay publishes them to ``access.decisions.v1`` on the real broker (then once more, as a relay that
crashed before marking them would), the analytics sink running inside the api process stores them in ClickHouse,
and the paywall funnel and the decision reasons count each decision once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from analytics_testkit import auth, create_project, pg_rows, relay_then_republish, signup, wait_for

from api.access.access_decisions import TOPIC_ACCESS_DECISIONS

pytestmark = pytest.mark.integration




def test_decisions_reach_clickhouse_and_fill_the_paywall_funnel(api, database_url, topics, analytics_settings):
    owner = signup(api, "owner")
    headers = auth(owner)
    project = create_project(api, owner, "Paywall")
    base = f"/api/v1/projects/{project}"
    start = datetime.now(UTC) - timedelta(minutes=1)
    api.put(f"{base}/feature-costs/gen", json={"cost_minor": 5}, headers=headers).raise_for_status()

    def check(subject: str, *, charge: bool = False) -> dict[str, Any]:
        r = api.post(f"{base}/access/check", json={"subject": subject, "feature_key": "gen", "charge": charge,
                                                   "asset_id": "model:llm-base", "action": "execute"},
                     headers={**headers, **({"Idempotency-Key": uuid.uuid4().hex} if charge else {})})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def buy(subject: str, credits: int) -> None:
        wallet = api.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": subject},
                          headers=headers).json()["id"]
        r = api.post(f"{base}/wallets/{wallet}/grants", json={"amount_minor": credits, "kind": "top_up"},
                     headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
        assert r.status_code == 201, r.text

    # s1 hits the paywall, buys, comes back; s2 hits it and leaves; s3 had credits all along
    assert check("s1")["reason"] == "insufficient_credits"
    assert check("s1", charge=True)["reason"] == "insufficient_credits"
    buy("s1", 20)
    assert check("s1", charge=True)["allowed"]
    assert check("s2")["reason"] == "insufficient_credits"
    buy("s3", 50)
    for _ in range(3):
        assert check("s3", charge=True)["allowed"]
    decisions = pg_rows(database_url, "SELECT count(*) FROM access_decisions WHERE project_id = %s", project)[0][0]
    assert decisions == 7

    # the relay publishes every outbox row (transactions and decisions), then the decisions go out once more
    relay_then_republish(database_url, topics, only_topic=TOPIC_ACCESS_DECISIONS)
    assert pg_rows(database_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == [(0,)]

    window = {"from": start.isoformat(), "to": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()}
    funnel_url = f"{base}/analytics/paywall-funnel"
    expected = [("requested", 3), ("paywalled", 2), ("purchased", 1), ("returned", 1)]

    def arrived() -> bool:
        funnel = api.get(funnel_url, params=window, headers=headers).json()
        return [(s["stage"], s["subjects"]) for s in funnel.get("stages", [])] == expected

    wait_for(arrived, timeout_s=90, what="access decisions and purchases to reach ClickHouse")
    decisions_topic = topics.name(TOPIC_ACCESS_DECISIONS)
    if analytics_settings.embedded:  # the sink thread in the api: wait until it read the second copies too
        sink = api.app.state.analytics_sink.sink
        wait_for(lambda: sink.stats.messages.get(decisions_topic, 0) >= 2 * decisions and not sink._pending,
                 timeout_s=60, what="the duplicate decisions to be consumed")
    funnel = api.get(funnel_url, params=window, headers=headers).json()
    assert [(s["stage"], s["subjects"]) for s in funnel["stages"]] == expected
    reasons = {(r["allowed"], r["reason"], r["policy_id"]): r["decisions"] for r in funnel["reasons"]}
    assert reasons == {(False, "insufficient_credits", "credit_balance"): 3, (True, "", "credit_balance"): 4}
