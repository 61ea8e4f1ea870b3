"""The sign-up bonus over HTTP against the real PostgreSQL ledger: amounts by explicit country, GeoIP and default,
a country at 0, one bonus per device, the IP-network daily limit, a retried creation granting once, the bonus
bucket's expiry, the config routes' roles, validation and audit."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tenancy_testkit import Team, api_client, create_project, five_users, signup, sql, team

pytestmark = pytest.mark.integration

CONFIG = {"default_amount_minor": 100, "country_amounts": {"US": 500, "gb": 400, "IN": 0},
          "expires_after_s": 30 * 24 * 3600, "ip_network_daily_limit": 2}


def _bonus_path(project_id: str) -> str:
    return f"/api/v1/projects/{project_id}/signup-bonus"


def _configure(client: TestClient, t: Team, config: dict[str, Any] | None = None) -> dict[str, Any]:
    r = client.put(_bonus_path(t.project_id), json=config or CONFIG, headers=t.by_role["admin"].headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _signup(client: TestClient, t: Team, subject: str | None = None, **facts: Any) -> Any:
    body: dict[str, Any] = {"owner_kind": "subject", "owner_ref": subject or f"user-{uuid.uuid4().hex[:8]}"}
    if facts:
        body["signup"] = facts
    return client.post(f"/api/v1/projects/{t.project_id}/wallets", json=body, headers=t.by_role["admin"].headers)


def _granted(r: Any) -> tuple[int, str]:
    assert r.status_code in (200, 201), r.text
    bonus = r.json()["bonus"]
    return bonus["granted_minor"], bonus["reason"]


def test_bonus_by_country_default_and_zero(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        assert _granted(_signup(client, t, country="US")) == (0, "not_configured")  # nothing configured yet
        config = _configure(client, t)
        assert config["country_amounts"] == {"US": 500, "GB": 400, "IN": 0}

        us = _signup(client, t, country="us", ip="203.0.113.7", device_id="d-us")
        assert us.status_code == 201 and _granted(us) == (500, "granted")
        assert us.json()["balance"]["balance_minor"] == 500
        assert us.json()["bonus"]["country"] == "US" and us.json()["bonus"]["country_source"] == "explicit"
        assert _granted(_signup(client, t, country="GB", device_id="d-gb")) == (400, "granted")
        default = _signup(client, t, country="DE", device_id="d-de")
        assert _granted(default) == (100, "granted")
        unknown = _signup(client, t)  # no facts at all → the default amount
        assert _granted(unknown) == (100, "granted") and unknown.json()["bonus"]["country"] is None
        zero = _signup(client, t, country="IN", device_id="d-in")
        assert zero.status_code == 201, zero.text  # a refused bonus is not an error: the wallet exists
        assert _granted(zero) == (0, "country_zero") and zero.json()["balance"]["balance_minor"] == 0
        assert "country" in zero.json()["bonus"]["detail"]

        # member and project wallets never get a sign-up bonus (and cannot carry sign-up facts)
        project_wallet = client.post(f"/api/v1/projects/{t.project_id}/wallets", json={"owner_kind": "project"},
                                     headers=t.by_role["admin"].headers)
        assert project_wallet.status_code == 201 and project_wallet.json()["bonus"] is None
        r = client.post(f"/api/v1/projects/{t.project_id}/wallets",
                        json={"owner_kind": "project", "signup": {"country": "US"}}, headers=t.by_role["admin"].headers)
        assert r.status_code == 422 and "subject" in r.text

        # the bonus is a 'bonus' bucket with the configured expiry, posted as a bonus transaction
        wallet = us.json()["id"]
        buckets = client.get(f"/api/v1/projects/{t.project_id}/wallets/{wallet}/buckets",
                             headers=t.by_role["viewer"].headers).json()
        assert [(b["source"], b["granted_minor"]) for b in buckets] == [("bonus", 500)]
        created = datetime.fromisoformat(us.json()["created_at"])
        expires = datetime.fromisoformat(buckets[0]["expires_at"])
        assert timedelta(days=30) - timedelta(minutes=1) < expires - created < timedelta(days=30, minutes=1)
        assert expires == datetime.fromisoformat(us.json()["bonus"]["expires_at"])
        txs = client.get(f"/api/v1/projects/{t.project_id}/wallets/{wallet}/transactions",
                         headers=t.by_role["viewer"].headers).json()["items"]
        assert [(x["kind"], x["amount_minor"], x["id"]) for x in txs] == [
            ("bonus", 500, us.json()["bonus"]["transaction_id"])]
        assert txs[0]["idempotency_key"] == f"signup_bonus:{t.project_id}:{wallet}"

        # the raw device id is never stored, only a keyed hash
        stored = sql(database_url, "SELECT device_hash, ip_network FROM signup_bonus_grants WHERE wallet_id = %s",
                     wallet)
        assert stored[0][0] and "d-us" not in stored[0][0] and stored[0][1] == "203.0.113.0/24"
        audit = sql(database_url, "SELECT after->'bonus'->>'granted_minor' FROM audit_log "
                                  "WHERE action = 'wallet.create' AND target_id = %s", wallet)
        assert audit == [("500",)]


def test_one_bonus_per_device_and_ip_network_limit(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        _configure(client, t)
        assert _granted(_signup(client, t, device_id="phone-1", ip="198.51.100.1")) == (100, "granted")
        again = _signup(client, t, device_id="phone-1", ip="192.0.2.1")
        assert again.status_code == 201 and _granted(again) == (0, "device_seen")
        assert "device" in again.json()["bonus"]["detail"]
        # another project does not see this project's devices
        other = Team(create_project(client, t.by_role["owner"], "Other"), {**t.by_role, "admin": t.by_role["owner"]})
        _configure(client, other)
        assert _granted(_signup(client, other, device_id="phone-1")) == (100, "granted")

        # limit 2 per /24 per day: a third device from 198.51.100.x is refused; another /24 is fine
        assert _granted(_signup(client, t, device_id="phone-2", ip="198.51.100.77")) == (100, "granted")
        assert _granted(_signup(client, t, device_id="phone-3", ip="198.51.100.200")) == (0, "ip_network_limit")
        assert _granted(_signup(client, t, device_id="phone-4", ip="198.51.101.1")) == (100, "granted")
        # refusals do not count: the refused ones above did not use up the network's allowance elsewhere
        assert _granted(_signup(client, t, device_id="phone-5", ip="2001:db8:1:2::1")) == (100, "granted")
        assert _granted(_signup(client, t, device_id="phone-6", ip="2001:db8:1:2::ffff")) == (100, "granted")
        assert _granted(_signup(client, t, device_id="phone-7", ip="2001:db8:1:2:aaaa::1")) == (0, "ip_network_limit")
        assert _granted(_signup(client, t, device_id="phone-8", ip="2001:db8:1:3::1")) == (100, "granted")
        # a rolling day: once the earlier grants are older than 24 h the network may get bonuses again
        sql(database_url, "UPDATE signup_bonus_grants SET created_at = created_at - interval '25 hours' "
                          "WHERE project_id = %s AND ip_network = '198.51.100.0/24'", t.project_id)
        assert _granted(_signup(client, t, device_id="phone-9", ip="198.51.100.9")) == (100, "granted")


def test_retried_creation_grants_once(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        t = team(client, five_users(client))
        _configure(client, t)
        first = _signup(client, t, "cust-1", country="US", device_id="dev-1")
        assert first.status_code == 201 and _granted(first) == (500, "granted")
        retry = _signup(client, t, "cust-1", country="US", device_id="dev-1")
        assert retry.status_code == 200 and retry.json()["bonus"] == first.json()["bonus"]
        assert retry.json()["balance"]["balance_minor"] == 500
        # a refused decision is answered the same on a retry too
        refused = _signup(client, t, "cust-2", country="US", device_id="dev-1")
        assert _granted(refused) == (0, "device_seen")
        assert _signup(client, t, "cust-2", device_id="dev-9").json()["bonus"] == refused.json()["bonus"]
        assert sql(database_url, "SELECT count(*) FROM transactions WHERE kind = 'bonus' AND project_id = %s",
                   t.project_id) == [(1,)]
        # a wallet that existed before (not created at sign-up) gets no bonus decision
        sql(database_url, "DELETE FROM signup_bonus_grants WHERE wallet_id = %s", first.json()["id"])
        assert _granted(_signup(client, t, "cust-1")) == (0, "existing_wallet")


def test_country_from_geoip_database(database_url: str, engines: Any, tmp_path: Path) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", languages=["en"], ipv4_compatible=True)
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    writer.to_db_file(str(tmp_path / "c.mmdb"))
    with api_client(database_url, engines, geoip_database_path=str(tmp_path / "c.mmdb")) as client:
        t = team(client, five_users(client))
        _configure(client, t)
        geo = _signup(client, t, ip="81.2.69.160")
        assert _granted(geo) == (400, "granted") and geo.json()["bonus"]["country_source"] == "geoip"
        assert _granted(_signup(client, t, ip="81.2.69.161", country="US")) == (500, "granted")  # explicit wins
        assert _granted(_signup(client, t, ip="8.8.8.8"))[0] == 100  # not in the database → default
    with api_client(database_url, engines, geoip_database_path=str(tmp_path / "missing.mmdb")) as client:
        broken = _signup(client, t, ip="81.2.70.170")
        assert broken.status_code == 201 and _granted(broken) == (100, "granted")  # a broken database is no error


def test_config_routes_roles_validation_and_audit(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        path = _bonus_path(t.project_id)
        assert client.get(path, headers=users["viewer"].headers).status_code == 404  # nothing configured yet
        for role in ("viewer", "member"):
            r = client.put(path, json=CONFIG, headers=users[role].headers)
            assert r.status_code == 403, (role, r.text)
        assert client.put(path, json=CONFIG, headers=users["outsider"].headers).status_code == 404
        assert client.get(path, headers=users["outsider"].headers).status_code == 404
        stranger = signup(client, "stranger")
        assert client.put(path, json=CONFIG, headers=stranger.headers).status_code == 404

        _configure(client, t)
        assert client.get(path, headers=users["viewer"].headers).json()["country_amounts"]["GB"] == 400
        changed = client.put(path, json={"default_amount_minor": 7}, headers=users["owner"].headers)
        assert changed.status_code == 200 and changed.json()["country_amounts"] == {}

        for bad, hint in (({"country_amounts": {"USA": 5}}, "two letters"),
                          ({"country_amounts": {"US": -1}}, "0 (no bonus there)"),
                          ({"country_amounts": {"us": 1, "US": 2}}, "listed twice"),
                          ({"default_amount_minor": -5}, "greater than or equal to 0"),
                          ({"expires_after_s": 10}, "greater than or equal to 3600"),
                          ({"default_amount": 5}, "extra")):
            r = client.put(path, json=bad, headers=users["admin"].headers)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["code"] == "api.validation_failed" and hint in r.text, (bad, r.text)

        entries = client.get(f"/api/v1/projects/{t.project_id}/audit-log", params={"action": "signup_bonus.put"},
                             headers=users["owner"].headers).json()["items"]
        assert len(entries) == 2
        assert entries[0]["before"]["default_amount_minor"] == 100 and entries[0]["after"]["default_amount_minor"] == 7
        assert entries[1]["before"] is None and entries[1]["actor_user_id"] == users["admin"].user_id
