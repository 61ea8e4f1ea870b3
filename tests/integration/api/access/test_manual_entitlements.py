"""An admin grants a plan without a payment provider (local testing, sales-led customers): the entitlement opens
a feature gated by ``requires_entitlement`` at once, a retry with the same reference grants once (credits too),
every grant and end is in the audit log, only admins may do it, and ending it closes the gate again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tenancy_testkit import api_client, five_users, money, team

pytestmark = pytest.mark.integration


def test_admin_grant_of_a_plan_opens_the_gate_once_and_is_audited(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        base = f"/api/v1/projects/{t.project_id}"
        admin, viewer = t.by_role["admin"].headers, t.by_role["viewer"].headers
        r = client.post(f"{base}/plans", headers=admin, json={
            "slug": "pro_monthly", "name": "Pro", "credits_minor": 5000, "price_minor": 2000, "currency": "usd",
            "interval": "month", "credits_expire": "period_end"})
        assert r.status_code == 201, r.text
        r = client.put(f"{base}/feature-costs/export", headers=admin,
                       json={"cost_minor": 1, "requires_entitlement": "pro_monthly"})
        assert r.status_code in (200, 201), r.text
        wallet = client.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": "acme-corp"},
                             headers=admin).json()["id"]
        assert money(client, f"{base}/wallets/{wallet}/grants", {"amount_minor": 10, "kind": "top_up"},
                     admin).status_code == 201

        def check() -> dict[str, Any]:
            r = client.post(f"{base}/access/check", headers=admin,
                            json={"subject": "acme-corp", "feature_key": "export"})
            assert r.status_code == 200, r.text
            return dict(r.json())

        assert (check()["allowed"], check()["reason"]) == (False, "upgrade_required")

        period_end = datetime.now(UTC) + timedelta(days=30)
        grant = {"plan": "pro_monthly", "reason": "contract ACME-14", "reference": "ACME-14",
                 "period_end": period_end.isoformat(), "grant_credits": True}
        assert client.post(f"{base}/wallets/{wallet}/entitlements", json=grant, headers=viewer).status_code == 403
        r = client.post(f"{base}/wallets/{wallet}/entitlements", json=grant, headers=admin)
        assert r.status_code == 201, r.text
        granted = r.json()
        assert (granted["plan"], granted["provider"], granted["active"], granted["external_subscription_id"]) == (
            "pro_monthly", "manual", True, "ACME-14")
        assert granted["credits_transaction_id"] is not None
        assert check()["allowed"] is True

        again = client.post(f"{base}/wallets/{wallet}/entitlements", json=grant, headers=admin)
        assert (again.status_code, again.json()["id"]) == (200, granted["id"])  # the same reference grants once
        balance = client.get(f"{base}/wallets/{wallet}", headers=viewer).json()["balance"]["balance_minor"]
        assert balance == 10 + 5000  # the plan's credits, once
        buckets = client.get(f"{base}/wallets/{wallet}/buckets", headers=viewer).json()
        subscription = [b for b in buckets if b["source"] == "subscription"]
        assert len(subscription) == 1 and subscription[0]["expires_at"] is not None  # they expire with the period

        other = client.post(f"{base}/wallets/{wallet}/entitlements", headers=admin,
                            json={"plan": "no-such-plan", "reason": "x"})
        assert other.status_code == 404
        missing = client.post(f"{base}/wallets/{wallet}/entitlements", headers=admin, json={})
        assert missing.status_code == 422 and sorted(missing.json()["missing"]) == ["plan", "reason"]

        r = client.post(f"{base}/wallets/{wallet}/entitlements/{granted['id']}/end", headers=admin,
                        json={"reason": "contract ended"})
        assert (r.status_code, r.json()["status"], r.json()["active"]) == (200, "ended", False)
        assert (check()["allowed"], check()["reason"]) == (False, "upgrade_required")

        audit = client.get(f"{base}/audit-log", headers=t.by_role["owner"].headers).json()
        items = audit["items"] if isinstance(audit, dict) else audit
        actions = [a["action"] for a in items if a["target_id"] == granted["id"]]
        assert sorted(actions) == ["entitlement.end", "entitlement.grant"]


def test_the_cli_grants_and_ends_a_plan_once_and_audits_it(database_url: str, engines: Any) -> None:
    import os
    import subprocess
    import sys

    import orjson

    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        base = f"/api/v1/projects/{t.project_id}"
        admin = t.by_role["admin"].headers
        assert client.post(f"{base}/plans", headers=admin, json={
            "slug": "team", "name": "Team", "credits_minor": 100, "price_minor": 900, "currency": "usd",
            "interval": "month"}).status_code == 201
        assert client.put(f"{base}/feature-costs/export", headers=admin,
                          json={"cost_minor": 0, "requires_entitlement": "*"}).status_code in (200, 201)
        wallet = client.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": "cli-co"},
                             headers=admin).json()["id"]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "meterline", "entitlements", *args], capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "DATABASE_URL": database_url})

        def allowed() -> bool:
            r = client.post(f"{base}/access/check", headers=admin, json={"subject": "cli-co", "feature_key": "export"})
            return bool(r.json()["allowed"])

        assert not allowed()
        args = ("grant", "-p", t.project_id, wallet, "--plan", "team", "--reason", "local test", "--reference", "CLI-1")
        first, second = cli(*args), cli(*args)
        assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
        one, two = orjson.loads(first.stdout), orjson.loads(second.stdout)
        assert (one["created"], two["created"], one["id"]) == (True, False, two["id"])
        assert allowed()
        assert cli("grant", "-p", t.project_id, wallet, "--plan", "nope", "--reason", "x").returncode == 1
        ended = cli("end", "-p", t.project_id, wallet, one["id"], "--reason", "done")
        assert ended.returncode == 0 and orjson.loads(ended.stdout)["status"] == "ended", ended.stderr
        assert not allowed()
        audit = client.get(f"{base}/audit-log", headers=t.by_role["owner"].headers).json()
        items = audit["items"] if isinstance(audit, dict) else audit
        assert sorted(a["action"] for a in items if a["target_id"] == one["id"]) == ["entitlement.end",
                                                                                    "entitlement.grant"]
