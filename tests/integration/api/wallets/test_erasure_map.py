"""Account erasure does what the data map says (api/wallets/erasure_map.py, docs/erasure.md), in every store.

- the map covers every column of PostgreSQL and ClickHouse whose name looks personal, every Kafka topic, and
  docs/erasure.md carries the table generated from it;
- after the ``erase_accounts`` job (run as the application role, through the SECURITY DEFINER paths) and the
  ClickHouse pass, no row of a rewritable store holds the subject in clear; where records are kept the subject
  is its keyed pseudonym (same input → same pseudonym, totals per pseudonym add up); balances and the hash chain
  (``ledger.chain.verify``) still hold; another subject's data is untouched;
- an erased subject that comes back under ``auto_provision`` gets a fresh wallet, charged exactly once, and its
  old wallet stays closed."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from tenancy_testkit import api_client, five_users, money, sql, team

from analytics.client import connect
from analytics.migrate import migrate as migrate_clickhouse
from api.wallets import erasure_map
from api.wallets.erasure import erase_due
from api.wallets.erasure_analytics import EmbeddedErasurePass, erase_analytics_due
from api.wallets.pseudonyms import pseudonym
from ledger import chain, queries
from ledger.checkpoints import apply_checkpoint
from ledger.contracts import ChargeCheckpoint, CounterKey, CounterValue, PriceModel
from ledger.db import make_engine
from meterline.services import app_database_url
from meterline.topics import topic_specs
from streams.catalog import load_catalog
from streams.catalog_model import ProjectPolicy, auto_wallet_id

pytestmark = pytest.mark.integration

SUBJECT = "alice@example.com"
OTHER = "bob@example.com"
KEY = b"test-erasure-key-0123456789abcdef0123456789"
PERSONAL = re.compile(r"email|subject|user|(^|_)ip(_|$)|ip_network|metadata|owner_ref|customer|device|body|payload|"
                      r"^before$|^after$|^event$|^data$|address|actor_id|accepted_by|invited_by|headers")
ROOT = Path(__file__).resolve().parents[4]


def test_the_map_covers_every_personal_column_and_topic_and_the_doc_is_generated(database_url: str,
                                                                                   tmp_path: Path) -> None:
    pg = {(t, c) for t, c in sql(database_url, """
        SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'""")
          if PERSONAL.search(c)}
    missing = pg - erasure_map.mapped_columns("postgres")
    assert not missing, f"personal-looking PostgreSQL columns missing from api/wallets/erasure_map.py: {missing}"
    ch = connect(f"chdb://{tmp_path / 'ch'}")
    try:
        migrate_clickhouse(ch, database="meterline")
        columns = {(t, c) for t, c in ch.query(
            "SELECT table, name FROM system.columns WHERE database = 'meterline' AND table NOT LIKE '.inner%' "
            "AND table <> 'schema_migrations'").result_rows if PERSONAL.search(c)}
    finally:
        ch.close()
    assert not columns - erasure_map.mapped_columns("clickhouse"), columns - erasure_map.mapped_columns("clickhouse")
    topics = {s.name for s in topic_specs(prefix="", usage_partitions=1, charges_partitions=1,
                                          transactions_partitions=1)}
    assert topics == {e.table for e in erasure_map.ENTRIES if e.store == "kafka"}
    names = {e.name for e in erasure_map.ENTRIES}
    for entry in erasure_map.ENTRIES:  # every actionable entry is done by a step, its own or a named one's
        if entry.action in erasure_map.ACTIONABLE:
            assert entry.apply or entry.analytics or entry.covered_by in names, entry
        else:
            assert entry.apply is None and entry.analytics is None, entry
    assert erasure_map.markdown_table() in (ROOT / "docs" / "erasure.md").read_text(), \
        "docs/erasure.md is stale: paste erasure_map.markdown_table() (python -m api.wallets.erasure_map)"


def _clickhouse_rows(ch: Any, project: str, wallet: str, subject: str, *, units: tuple[int, ...],
                     offset: int) -> None:
    now = datetime.now(UTC)
    ch.insert("meterline.usage_events", [
        [project, "tokens", subject, wallet, now, Decimal(u), f"e{offset + i}", "app", f'{{"user": "{subject}", '
         f'"tokens": {u}}}', now, "usage.events.v1", 0, offset + i, 0] for i, u in enumerate(units)],
        column_names=["project_id", "event_type", "subject", "wallet_id", "time", "units", "event_id", "source",
                      "data", "ingested_at", "kafka_topic", "kafka_partition", "kafka_offset", "kafka_index"])
    ch.insert("meterline.access_decisions", [[f"d{offset}", project, subject, wallet, "", "gen", 1, "allowed", "",
                                             5, now, now, "access.decisions.v1", 0, offset, 0]],
              column_names=["decision_id", "project_id", "subject", "wallet_id", "asset_id", "action", "allowed",
                            "reason", "policy_id", "cost_minor", "time", "ingested_at", "kafka_topic",
                            "kafka_partition", "kafka_offset", "kafka_index"])
    ch.insert("meterline.dead_letters", [[project, now, "unknown_meter", f'{{"subject": "{subject}"}}', "{}",
                                         "usage.events.dlq.v1", 0, offset, 0]],
              column_names=["project_id", "received_at", "reason", "payload", "headers", "kafka_topic",
                            "kafka_partition", "kafka_offset", "kafka_index"])


def _customer(client: Any, t: Any, subject: str) -> str:
    base = f"/api/v1/projects/{t.project_id}"
    r = client.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": subject},
                    headers=t.by_role["admin"].headers)
    assert r.status_code == 201, r.text
    wallet = str(r.json()["id"])
    assert money(client, f"{base}/wallets/{wallet}/grants", {"amount_minor": 500},
                 t.by_role["admin"].headers).status_code == 201
    debit = money(client, f"{base}/wallets/{wallet}/debit",
                  {"amount_minor": 120, "metadata": {"customer": subject, "plan": "pro"}}, t.by_role["member"].headers)
    assert debit.status_code == 201, debit.text
    check = money(client, f"{base}/access/check", {"subject": subject, "feature_key": "gen", "charge": True},
                  t.by_role["member"].headers)
    assert check.status_code == 200 and check.json()["allowed"], check.text
    return wallet


def _tables_holding(database_url: str, value: str, exempt: set[str]) -> set[str]:
    tables = [t for (t,) in sql(database_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    return {t for t in tables if t not in exempt and sql(
        database_url, f'SELECT count(*) FROM "{t}" x WHERE strpos(x::text, %s) > 0', value)[0][0]}


def test_erasure_pseudonymises_every_mapped_store_and_the_ledger_still_verifies(database_url: str, engines: Any,
                                                                                  tmp_path: Path) -> None:
    ch = connect(f"chdb://{tmp_path / 'ch'}")
    migrate_clickhouse(ch, database="meterline")
    with api_client(database_url, engines, erasure_grace_s=0) as client:
        t = team(client, five_users(client))
        client.put(f"/api/v1/projects/{t.project_id}/feature-costs/gen", json={"cost_minor": 5},
                   headers=t.by_role["admin"].headers).raise_for_status()
        wallet, other = _customer(client, t, SUBJECT), _customer(client, t, OTHER)
        _clickhouse_rows(ch, t.project_id, wallet, SUBJECT, units=(5, 7), offset=10)
        _clickhouse_rows(ch, t.project_id, other, OTHER, units=(3,), offset=20)
        exempt = {e.table for e in erasure_map.ENTRIES if e.store == "postgres"
                  and e.action in ("expires", "keep (law)")}  # outbox, payments, webhook_events: see the map
        assert {"audit_log", "access_decisions", "transactions", "subject_keys", "wallets"} <= \
            _tables_holding(database_url, SUBJECT, exempt)  # the test can fail: the data is there
        assert client.post(f"/api/v1/projects/{t.project_id}/wallets/{wallet}/erasure",
                           headers=t.by_role["admin"].headers).status_code == 202

    engine = make_engine(app_database_url(database_url), pool_size=1)  # as the application role
    try:
        with engine.begin() as conn:
            assert erase_due(conn, now=datetime.now(UTC), key=KEY) == 1
        # the pass as an api owning an embedded chDB runs it: a background round finds the queued account
        running = EmbeddedErasurePass(engine, lambda: (contextlib.nullcontext(ch), "meterline"), every_s=0.05)
        running.start()
        try:
            deadline = time.monotonic() + 20
            while sql(database_url, "SELECT count(*) FROM wallet_erasures WHERE analytics_pending IS NOT NULL")[0][0]:
                assert time.monotonic() < deadline, "the embedded ClickHouse pass never ran"
                time.sleep(0.05)
        finally:
            running.stop()
        with engine.begin() as conn:
            assert erase_analytics_due(conn, ch, database="meterline") == 0  # done: nothing queued
            report = chain.verify(conn, project_id=t.project_id)
            balance, other_balance = queries.get_balance(conn, wallet), queries.get_balance(conn, other)
    finally:
        engine.dispose()

    assert _tables_holding(database_url, SUBJECT, exempt) == set()
    assert _tables_holding(database_url, OTHER, exempt) >= {"audit_log", "access_decisions", "transactions"}
    alias = pseudonym(KEY, t.project_id, SUBJECT)
    assert alias == pseudonym(KEY, t.project_id, SUBJECT) != pseudonym(KEY, t.project_id, OTHER)
    assert sql(database_url, "SELECT count(*), sum(cost_minor) FROM access_decisions WHERE subject = %s",
               alias) == [(1, 5)]
    assert sql(database_url, "SELECT metadata->>'customer' FROM transactions WHERE wallet_id = %s AND "
               "metadata ? 'customer'", wallet) == [(alias,)]
    assert sql(database_url, "SELECT count(*) FROM audit_log WHERE strpos(after::text, %s) > 0", alias)[0][0] >= 1
    assert report.ok, report.breaks
    assert report.redacted == 1  # the debit's metadata: every other field is still verified by the chain
    assert balance is not None and balance.balance_minor == 0  # 500 − 120 − 5, the rest forfeited
    assert other_balance is not None and other_balance.balance_minor == 375
    try:
        for table in ("usage_events", "access_decisions", "dead_letters"):
            rows = ch.query(f"SELECT * FROM meterline.{table}").result_rows
            assert not [r for r in rows if SUBJECT in str(r)], table
            assert [r for r in rows if OTHER in str(r)], table  # the other subject is untouched
        assert ch.query("SELECT subject, count(), sum(units) FROM meterline.usage_events GROUP BY subject "
                        "ORDER BY subject").result_rows == sorted([(OTHER, 1, Decimal(3)), (alias, 2, Decimal(12))])
    finally:
        ch.close()


def _usage(wallet: str, project: str, *, offset: int, units: int) -> ChargeCheckpoint:
    return ChargeCheckpoint(
        source_topic="usage.events.v1", partition=0, as_of_offset=offset, emitted_at=datetime.now(UTC),
        counters=[CounterValue(key=CounterKey(wallet_id=wallet, project_id=project, meter_id="m",
                                              period_start=datetime(2026, 12, 1, tzinfo=UTC), price_version_id="v1"),
                               units=Decimal(units), price=PriceModel(model="per_unit", unit_price_minor=1),
                               events=units)])


def test_an_erased_subject_that_comes_back_gets_a_fresh_wallet_charged_once(database_url: str,
                                                                            engines: Any) -> None:
    with api_client(database_url, engines, erasure_grace_s=0) as client:
        t = team(client, five_users(client))
        base = f"/api/v1/projects/{t.project_id}/wallets"
        old = client.post(base, json={"owner_kind": "subject", "owner_ref": SUBJECT},
                          headers=t.by_role["admin"].headers).json()["id"]
        assert old == auto_wallet_id(t.project_id, SUBJECT)
        assert client.post(f"{base}/{old}/erasure", headers=t.by_role["admin"].headers).status_code == 202
        engine = make_engine(app_database_url(database_url), pool_size=1)
        try:
            with engine.begin() as conn:
                assert erase_due(conn, now=datetime.now(UTC), key=KEY) == 1
            with engine.begin() as conn:  # what a stream worker resolves for the subject's next event
                snapshot = load_catalog(conn, default_policy=ProjectPolicy("auto_provision", 0))
            fresh = snapshot.auto_wallet(t.project_id, SUBJECT)
            assert fresh == auto_wallet_id(t.project_id, SUBJECT, 1) != old
            assert snapshot.auto_wallet(t.project_id, OTHER) == auto_wallet_id(t.project_id, OTHER)
            for _ in range(2):  # the same checkpoint delivered twice: charged once
                with engine.begin() as conn:
                    apply_checkpoint(conn, _usage(fresh, t.project_id, offset=7, units=30))
            with engine.begin() as conn:
                new_balance, old_balance = queries.get_balance(conn, fresh), queries.get_balance(conn, old)
        finally:
            engine.dispose()
        assert new_balance is not None and new_balance.balance_minor == -30
        assert old_balance is not None and old_balance.balance_minor == 0
        # the operator's sign-up call for the returning user adopts the fresh wallet; the old one stays closed
        again = client.post(base, json={"owner_kind": "subject", "owner_ref": SUBJECT},
                            headers=t.by_role["admin"].headers)
        assert again.status_code in (200, 201) and again.json()["id"] == fresh, again.text
        assert again.json()["closed_at"] is None
        assert client.get(f"{base}/{old}", headers=t.by_role["viewer"].headers).json()["closed_at"] is not None
        check = money(client, f"/api/v1/projects/{t.project_id}/access/check",
                      {"subject": SUBJECT, "feature_key": "x", "charge": False}, t.by_role["member"].headers)
        assert check.status_code in (200, 422), check.text
        assert sql(database_url, "SELECT wallet_id FROM subject_keys WHERE project_id = %s AND subject = %s",
                   t.project_id, SUBJECT) == [(fresh,)]
        assert sql(database_url, "SELECT count(*) FROM transactions WHERE wallet_id = %s", old) == [(0,)]
