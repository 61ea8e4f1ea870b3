"""Backfill sessions over HTTP against the real PostgreSQL: the dry-run's figures are what the close posts, a close
posts once (also when retried after a crash), a revert posts nothing, a closed period is charged now with its
original period recorded, an event charged live is not charged again, and bad input gets problem+json.

"Charged live" is the live path minus the broker: the workers' own metering core (``PartitionAggregator``) turns
the events into a checkpoint and the ledger's ``apply_checkpoint`` applies it, dedupe keys and all — exactly what a
worker and the ledger consumer do with it after Kafka."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from tenancy_testkit import add_member, api_client, create_project, signup, sql

from ledger.checkpoints import apply_checkpoint
from ledger.contracts import ChargeCheckpoint
from ledger.db import make_engine
from streams.catalog import load_catalog
from streams.catalog_model import ProjectPolicy
from streams.metering import PartitionAggregator

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
#: a period that ended long ago (closed: its end plus the allowed lateness has passed)
CLOSED = (NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - timedelta(days=40)).replace(day=10)
PROBLEM = "application/problem+json"


def _event(i: int, tokens: int, at: datetime, *, subject: str = "cust-1", prefix: str = "bf") -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"{prefix}-{i}", "source": "billing-v1", "type": "llm.tokens",
            "subject": subject, "time": at.isoformat().replace("+00:00", "Z"), "data": {"tokens": tokens}}


def _project(client: TestClient, *roles: str) -> tuple[str, dict[str, Any]]:
    """A project with a meter ``tokens`` priced per unit (2 minor per token) after 100 free tokens a month, its
    owner and a member in each of ``roles`` (sign-ups hash passwords: only the users a test needs)."""
    users = {"owner": signup(client, "owner")}
    project_id = create_project(client, users["owner"])
    for role in roles:
        users[role] = signup(client, role)
        add_member(client, project_id, users["owner"], users[role], role)
    owner = users["owner"].headers
    p = f"/api/v1/projects/{project_id}"
    assert client.post(f"{p}/meters", json={"slug": "tokens", "event_type": "llm.tokens",
                                            "value_property": "$.tokens"}, headers=owner).status_code == 201
    r = client.post(f"{p}/prices", json={"meter": "tokens", "effective_from": (CLOSED - timedelta(days=30)).isoformat(),
                                         "model": {"model": "per_unit", "unit_price_minor": "2", "free_units": "100"}},
                    headers=owner)
    assert r.status_code == 201, r.text
    return project_id, users


def _open(client: TestClient, project_id: str, headers: dict[str, str]) -> str:
    r = client.post(f"/api/v1/projects/{project_id}/backfills", json={"description": "old system"}, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "open" and r.json()["ingest_url"].endswith(r.json()["id"])
    return str(r.json()["id"])


def _ingest(client: TestClient, project_id: str, session_id: str, events: list[dict[str, Any]],
            headers: dict[str, str]) -> Any:
    return client.post("/api/v1/events", params={"project_id": project_id, "backfill_session_id": session_id},
                       content=orjson.dumps(events), headers={**headers, "Content-Type": "application/cloudevents-batch+json"})


def _charge_live(database_url: str, project_id: str, events: list[dict[str, Any]]) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            catalog = load_catalog(conn, default_policy=ProjectPolicy("auto_provision", 3600))
            aggregator = PartitionAggregator(source_topic="usage.events.v1@live", partition=0, partitions=1)
            aggregator.seed(applied_through=-1, counters=(), dedupe_keys=(), periods_since=None)
            for offset, event in enumerate(events):  # arrived on time: charged in its own period
                at = datetime.fromisoformat(event["time"])
                assert not aggregator.process(offset=offset, value=orjson.dumps({**event, "project": project_id}),
                                              arrival=at, catalog=catalog)
            checkpoint = aggregator.checkpoint()
            assert checkpoint is not None
            outcome = apply_checkpoint(conn, ChargeCheckpoint.model_validate_json(checkpoint.to_json(emitted_at=NOW)))
            assert outcome.status == "applied"
    finally:
        engine.dispose()


def _backfill_transactions(database_url: str) -> list[tuple[Any, ...]]:
    return sql(database_url, "SELECT id, wallet_id, meter_id, period_start, amount_minor, created_at, metadata, kind "
                             "FROM transactions WHERE starts_with(source_ref, 'backfill:') ORDER BY id")


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("dry_run", "as_of", "transaction_ids")}


def test_dry_run_equals_close_which_posts_once_as_of_now_in_the_closed_period(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        project_id, users = _project(client, "admin")
        owner = users["owner"].headers
        # live usage of the closed period used 80 of its 100 free tokens: the backfill continues from there
        _charge_live(database_url, project_id, [_event(0, 80, CLOSED, prefix="live")])
        sid = _open(client, project_id, owner)
        held = [_event(1, 30, CLOSED + timedelta(hours=1)), _event(2, 20, CLOSED + timedelta(hours=2)),
                _event(3, 7, NOW - timedelta(minutes=5))]
        assert _ingest(client, project_id, sid, held, owner).status_code == 204
        # resent (a client retry): held once
        assert _ingest(client, project_id, sid, held[:1], owner).status_code == 204
        assert client.get(f"/api/v1/projects/{project_id}/backfills/{sid}", headers=owner).json()["events"] == 3

        diff = client.get(f"/api/v1/projects/{project_id}/backfills/{sid}/diff", headers=users["admin"].headers)
        assert diff.status_code == 200, diff.text
        preview = diff.json()
        assert preview["dry_run"] is True and preview["events"] == 3 and preview["accepted"] == 3
        by_period = {row["period_start"][:7]: row for row in preview["charges"]}
        closed = by_period[CLOSED.isoformat()[:7]]
        assert closed["units"] == "50" and closed["period_closed"] is True
        assert closed["charge_minor"] == 60  # (80 live + 50) − 100 free = 30 tokens × 2
        assert by_period[NOW.isoformat()[:7]]["charge_minor"] == 0  # 7 tokens of this month: inside its allowance
        assert by_period[NOW.isoformat()[:7]]["period_closed"] is False
        assert preview["charge_minor"] == 60 and preview["wallets"][0]["charge_minor"] == 60
        assert _backfill_transactions(database_url) == []  # a dry-run commits nothing
        assert client.get(f"/api/v1/projects/{project_id}/backfills/{sid}/diff", headers=owner).json()["charges"] \
            == preview["charges"]  # and can be asked again

        # a close that crashes before its commit posts nothing; the retry posts once
        from api.ingest import backfills

        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.connect() as conn:
                transaction = conn.begin()
                backfills.close(conn, project_id=project_id, session_id=sid, actor=None)
                transaction.rollback()
        finally:
            engine.dispose()
        assert _backfill_transactions(database_url) == []

        closed_r = client.post(f"/api/v1/projects/{project_id}/backfills/{sid}/close", headers=owner)
        assert closed_r.status_code == 200, closed_r.text
        result = closed_r.json()
        assert result["dry_run"] is False and _comparable(result) == _comparable(preview)
        posted = _backfill_transactions(database_url)
        assert [p[0] for p in posted] == result["transaction_ids"]
        assert sum(-p[4] for p in posted) == preview["charge_minor"] == 60
        (_tx_id, _wallet, _meter, period_start, amount, created_at, metadata, kind), = posted
        assert kind == "usage" and amount == -60
        assert period_start == CLOSED.replace(day=1, hour=0, minute=0, second=0, microsecond=0)  # original period
        assert created_at >= NOW - timedelta(minutes=1)  # posted as of now
        assert metadata["backfill_session_id"] == sid and metadata["period_closed"] is True
        assert metadata["original_period_start"].startswith(CLOSED.isoformat()[:7])

        again = client.post(f"/api/v1/projects/{project_id}/backfills/{sid}/close", headers=owner)
        assert again.status_code == 200 and again.headers["Meterline-Replayed"] == "true"
        assert again.json() == result and _backfill_transactions(database_url) == posted
        assert client.get(f"/api/v1/projects/{project_id}/backfills/{sid}/diff", headers=owner).json() == result
        # the ledger's own guard, should the session row ever say otherwise: the virtual source is applied
        assert sql(database_url, "SELECT applied_through FROM applied_offsets WHERE source_topic = %s",
                   f"backfill:{sid}") == [(0,)]


def test_revert_posts_nothing(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        project_id, users = _project(client)
        owner = users["owner"].headers
        sid = _open(client, project_id, owner)
        assert _ingest(client, project_id, sid, [_event(1, 500, CLOSED)], owner).status_code == 204
        assert client.get(f"/api/v1/projects/{project_id}/backfills/{sid}/diff",
                          headers=owner).json()["charge_minor"] == 800
        r = client.post(f"/api/v1/projects/{project_id}/backfills/{sid}/revert", headers=owner)
        assert r.status_code == 200 and r.json()["status"] == "reverted", r.text
        assert _backfill_transactions(database_url) == []
        assert sql(database_url,
                   "SELECT count(*) FROM usage_counters WHERE starts_with(source_topic, 'backfill:')") == [(0,)]
        close = client.post(f"/api/v1/projects/{project_id}/backfills/{sid}/close", headers=owner)
        assert close.status_code == 409 and close.json()["code"] == "backfill.not_open"
        assert _backfill_transactions(database_url) == []


def test_an_event_charged_live_or_by_an_earlier_backfill_is_not_charged_again(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        project_id, users = _project(client)
        owner = users["owner"].headers
        live = _event(1, 150, CLOSED)
        _charge_live(database_url, project_id, [live])  # 50 tokens beyond the allowance: 100 charged live
        first = _open(client, project_id, owner)
        assert _ingest(client, project_id, first, [live, _event(2, 10, CLOSED)], owner).status_code == 204
        result = client.post(f"/api/v1/projects/{project_id}/backfills/{first}/close", headers=owner).json()
        assert result["skipped"] == {"charged_live": 1} and result["accepted"] == 1
        assert result["charge_minor"] == 20  # only event 2: 160 − 100 free = 60 × 2 = 120, 100 of it charged live

        second = _open(client, project_id, owner)
        assert _ingest(client, project_id, second, [live, _event(2, 10, CLOSED), _event(3, 1, CLOSED)],
                       owner).status_code == 204
        preview = client.get(f"/api/v1/projects/{project_id}/backfills/{second}/diff", headers=owner).json()
        assert preview["skipped"] == {"charged_live": 1, "charged_by_backfill": 1}
        assert preview["charge_minor"] == 2
        assert client.post(f"/api/v1/projects/{project_id}/backfills/{second}/close",
                           headers=owner).json()["charge_minor"] == 2
        charged = sql(database_url, "SELECT -sum(amount_minor) FROM transactions WHERE kind = 'usage'")
        assert charged == [(122,)]  # 161 tokens in the period, 100 free, 2 minor each: exactly once


def test_bad_input_gets_problem_json(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        project_id, users = _project(client, "member", "viewer")
        other_project, other_users = _project(client)
        owner = users["owner"].headers
        base = f"/api/v1/projects/{project_id}/backfills"

        def problem(r: Any, status: int, code: str) -> None:
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith(PROBLEM) and r.json()["code"] == code, r.text

        # only an admin opens a session or asks for its dry-run
        problem(client.post(base, json={}, headers=users["member"].headers), 403, "api.forbidden")
        # unknown session: ingest, diff, close, revert
        problem(_ingest(client, project_id, "bf_nope", [_event(1, 1, CLOSED)], owner), 404, "backfill.not_found")
        for method, path in (("get", "/bf_nope/diff"), ("post", "/bf_nope/close"), ("post", "/bf_nope/revert")):
            problem(getattr(client, method)(base + path, headers=owner), 404, "backfill.not_found")
        sid = _open(client, project_id, owner)
        problem(client.get(f"{base}/{sid}/diff", headers=users["viewer"].headers), 403, "api.forbidden")
        # another project's session: not found through the other project (never revealed, never written)
        other_owner = other_users["owner"].headers
        problem(_ingest(client, other_project, sid, [_event(1, 1, CLOSED)], other_owner), 404, "backfill.not_found")
        problem(client.post(f"/api/v1/projects/{other_project}/backfills/{sid}/close", headers=other_owner), 404,
                "backfill.not_found")
        problem(client.post(f"{base}/{sid}/close", headers=other_owner), 404, "api.not_found")  # not a member
        # invalid events are rejected as in live ingestion, the valid ones held
        r = _ingest(client, project_id, sid, [_event(1, 5, CLOSED), {"id": "x"}], owner)
        problem(r, 400, "ingest.events_rejected")
        assert r.json()["accepted"] == 1
        assert client.get(f"{base}/{sid}", headers=owner).json()["events"] == 1
        # a closed session takes no more events and cannot be reverted
        assert client.post(f"{base}/{sid}/close", headers=owner).status_code == 200
        problem(_ingest(client, project_id, sid, [_event(9, 1, CLOSED)], owner), 409, "backfill.not_open")
        problem(client.post(f"{base}/{sid}/revert", headers=owner), 409, "backfill.not_open")
        assert client.get(f"{base}/{sid}", headers=owner).json()["events"] == 1
        # an empty or malformed body says so
        problem(client.post("/api/v1/events", params={"project_id": project_id, "backfill_session_id": sid},
                            content=b"[]", headers={**owner, "Content-Type": "application/json"}), 400,
                "ingest.invalid_body")
