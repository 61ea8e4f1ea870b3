"""Account erasure in ClickHouse: replace an erased subject by its keyed pseudonym (docs/erasure.md).

The caller (api/wallets/erasure_analytics.py) gives (project, {subject: pseudonym}); the pseudonym is computed
by the API with the deployment key, ClickHouse never sees the key. What each table gets — the registry
``api.wallets.erasure_map`` is the single source, and names these functions:

- ``usage_events``: ``subject`` is part of the sort key, which ClickHouse cannot UPDATE, so the subject's rows
  are rewritten: copied with ``subject`` and the subject's JSON string inside ``data`` replaced by the pseudonym
  (rows already copied — same Kafka coordinates under the pseudonym — are skipped, so a retry after a crash
  between the two steps copies nothing twice), then the originals are deleted (mutation, ``mutations_sync=2``).
  Units, times, meters and counts are unchanged, so totals per pseudonym equal the subject's totals.
- ``access_decisions``: ``subject`` updated in place (not a key column).
- ``dead_letters``: the subject's JSON string inside ``payload`` / ``headers`` replaced (letters kept 30 days).
Every statement is idempotent: running a pass twice changes nothing the second time."""

from __future__ import annotations

import json
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

__all__ = ["AnalyticsErasure", "pseudonymise_subjects"]

SYNC = {"mutations_sync": 2}
COPY_BATCH_ROWS = 50_000


@dataclass
class AnalyticsErasure:
    usage_events_rewritten: int = 0
    access_decisions_updated: int = 0
    dead_letters_updated: int = 0


def _count(client: Client, sql: str, params: dict[str, str]) -> int:
    return int(client.query(sql, parameters=params).result_rows[0][0])


def rewrite_usage_events(client: Client, database: str, project_id: str, subject: str, pseudonym: str) -> int:
    p = {"p": project_id, "s": subject, "ps": pseudonym, "tok": json.dumps(subject), "ptok": json.dumps(pseudonym)}
    table = f"`{database}`.usage_events"
    todo = _count(client, f"SELECT count() FROM {table} WHERE project_id = {{p:String}} AND subject = {{s:String}}", p)
    if not todo:
        return 0
    # read, rewrite in Python, re-insert (not INSERT … SELECT * REPLACE: the embedded chDB backend silently
    # inserts nothing for it, and a REPLACE alias would shadow the column in WHERE); the NOT IN skips rows a
    # previous, interrupted pass already copied
    result = client.query(f"""
        SELECT * FROM {table}
        WHERE project_id = {{p:String}} AND subject = {{s:String}}
          AND (kafka_topic, kafka_partition, kafka_offset, kafka_index) NOT IN (
              SELECT kafka_topic, kafka_partition, kafka_offset, kafka_index FROM {table}
              WHERE project_id = {{p:String}} AND subject = {{ps:String}})""", parameters=p)
    columns = list(result.column_names)
    at_subject, at_data = columns.index("subject"), columns.index("data")
    rows = [list(r) for r in result.result_rows]
    for row in rows:
        row[at_subject] = pseudonym
        row[at_data] = str(row[at_data]).replace(p["tok"], p["ptok"])
    for start in range(0, len(rows), COPY_BATCH_ROWS):
        client.insert(table, rows[start:start + COPY_BATCH_ROWS], column_names=columns,
                      settings={"async_insert": 0, "insert_deduplicate": 0})
    client.command(f"ALTER TABLE {table} DELETE WHERE project_id = {{p:String}} AND subject = {{s:String}}",
                   parameters=p, settings=SYNC)
    return todo


def update_access_decisions(client: Client, database: str, project_id: str, subject: str, pseudonym: str) -> int:
    p = {"p": project_id, "s": subject, "ps": pseudonym}
    table = f"`{database}`.access_decisions"
    todo = _count(client, f"SELECT count() FROM {table} WHERE project_id = {{p:String}} AND subject = {{s:String}}", p)
    if todo:
        client.command(f"ALTER TABLE {table} UPDATE subject = {{ps:String}} "
                       "WHERE project_id = {p:String} AND subject = {s:String}", parameters=p, settings=SYNC)
    return todo


def update_dead_letters(client: Client, database: str, project_id: str, subject: str, pseudonym: str) -> int:
    p = {"p": project_id, "tok": json.dumps(subject), "ptok": json.dumps(pseudonym)}
    table = f"`{database}`.dead_letters"
    where = "project_id = {p:String} AND (position(payload, {tok:String}) > 0 OR position(headers, {tok:String}) > 0)"
    todo = _count(client, f"SELECT count() FROM {table} WHERE {where}", p)
    if todo:
        client.command(f"ALTER TABLE {table} UPDATE payload = replaceAll(payload, {{tok:String}}, {{ptok:String}}), "
                       f"headers = replaceAll(headers, {{tok:String}}, {{ptok:String}}) WHERE {where}",
                       parameters=p, settings=SYNC)
    return todo


def pseudonymise_subjects(client: Client, *, database: str, project_id: str,
                          pairs: dict[str, str]) -> AnalyticsErasure:
    """Every ClickHouse table the erasure map names, for each (subject, pseudonym)."""
    done = AnalyticsErasure()
    for subject, pseudonym in sorted(pairs.items()):
        done.usage_events_rewritten += rewrite_usage_events(client, database, project_id, subject, pseudonym)
        done.access_decisions_updated += update_access_decisions(client, database, project_id, subject, pseudonym)
        done.dead_letters_updated += update_dead_letters(client, database, project_id, subject, pseudonym)
    return done
