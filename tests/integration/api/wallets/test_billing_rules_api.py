"""Billing rules over HTTP: roles (admins change, viewers read, outsiders see 404), schedule validation as
problem+json, pause/resume/archive, the runs log after the scheduler's job ran, and the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tenancy_testkit import api_client, five_users, money, team

from ledger import billing
from ledger.db import make_engine

pytestmark = pytest.mark.integration


def test_billing_rules_through_the_api(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        h = {role: s.headers for role, s in t.by_role.items()}
        base = f"/api/v1/projects/{t.project_id}"
        wallet = client.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": "acme"},
                             headers=h["owner"]).json()["id"]
        assert money(client, f"{base}/wallets/{wallet}/grants", {"amount_minor": 1_000}, h["admin"]).status_code == 201
        body = {"wallet_id": wallet, "name": "Pro seat", "amount_minor": 300, "schedule": {"kind": "daily"}}

        assert client.post(f"{base}/billing-rules", json=body, headers=h["member"]).status_code == 403
        assert client.post(f"{base}/billing-rules", json=body, headers=h["outsider"]).status_code == 404
        bad = client.post(f"{base}/billing-rules", json={**body, "schedule": {"kind": "monthly", "days": [31]}},
                          headers=h["admin"])
        assert (bad.status_code, bad.json()["code"]) == (422, "ledger.invalid_request")
        assert "1..28" in bad.json()["detail"]
        foreign = client.post(f"{base}/billing-rules", json={**body, "wallet_id": "w-nope"}, headers=h["admin"])
        assert (foreign.status_code, foreign.json()["code"]) == (404, "ledger.unknown_wallet")

        created = client.post(f"{base}/billing-rules", json=body, headers=h["admin"])
        assert created.status_code == 201, created.text
        rule = created.json()
        assert (rule["cron"], rule["status"]) == ("0 0 * * *", "active")
        assert datetime.fromisoformat(rule["next_run_at"]) > datetime.now(UTC)
        assert [r["id"] for r in client.get(f"{base}/billing-rules", headers=h["viewer"]).json()] == [rule["id"]]

        # the scheduler's job, two days on: two due times charged
        engine = make_engine(database_url, pool_size=1)
        try:
            for _ in range(3):
                with engine.begin() as conn:
                    billing.run_due(conn, now=datetime.now(UTC) + timedelta(days=2))
        finally:
            engine.dispose()
        runs = client.get(f"{base}/billing-runs", params={"rule_id": rule["id"]}, headers=h["viewer"]).json()
        assert [r["status"] for r in runs["items"]] == ["charged", "charged"]
        assert client.get(f"{base}/wallets/{wallet}", headers=h["viewer"]).json()["balance"]["balance_minor"] == 400
        tx = client.get(f"{base}/wallets/{wallet}/transactions/{runs['items'][0]['transaction_id']}",
                        headers=h["viewer"]).json()
        assert (tx["kind"], tx["amount_minor"], tx["source_ref"]) == ("debit", -300, f"billing_rule:{rule['id']}")

        paused = client.patch(f"{base}/billing-rules/{rule['id']}", json={"status": "paused", "amount_minor": 350},
                              headers=h["admin"]).json()
        assert (paused["status"], paused["amount_minor"]) == ("paused", 350)
        archived = client.delete(f"{base}/billing-rules/{rule['id']}", headers=h["admin"]).json()
        assert archived["status"] == "archived"
        again = client.patch(f"{base}/billing-rules/{rule['id']}", json={"status": "active"}, headers=h["admin"])
        assert again.status_code == 422
        assert client.get(f"{base}/billing-rules/br_missing", headers=h["viewer"]).status_code == 404

        actions = [e["action"] for e in client.get(f"{base}/audit-log", params={"limit": 100},
                                                    headers=h["admin"]).json()["items"]]
        assert {"billing_rule.create", "billing_rule.update", "billing_rule.archive"} <= set(actions)
