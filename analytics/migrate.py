"""Versioned ClickHouse DDL (analytics/schema/NNNN_name.sql), applied at start by whoever owns analytics.

Invariants:
- a version is recorded in ``schema_migrations`` only after all its statements succeeded;
- every statement is idempotent (``IF NOT EXISTS``), so a crash mid-file or two processes migrating at once
  (sink + api against a server) re-apply harmlessly;
- an applied file must not change: its checksum is compared and a mismatch is a loud SchemaError.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

from analytics.errors import SchemaError

SCHEMA_DIR = Path(__file__).parent / "schema"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self, database: str) -> list[str]:
        body = "\n".join(line for line in self.sql.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip().replace("${db}", f"`{database}`") for s in body.split(";") if s.strip()]


def load_migrations(directory: Path = SCHEMA_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise SchemaError(f"{path.name}: schema files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"duplicate schema versions in {directory}")
    return found


def migrate(client: Client, *, database: str) -> list[int]:
    """Create the database and apply pending versions in order; returns the versions applied now."""
    client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    client.command(
        f"CREATE TABLE IF NOT EXISTS `{database}`.schema_migrations "
        "(version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY version"
    )
    applied = {int(v): c for v, c in client.query(
        f"SELECT version, any(checksum) FROM `{database}`.schema_migrations GROUP BY version").result_rows}
    done = []
    for migration in load_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise SchemaError(f"schema version {migration.version} ({migration.name}) was changed after it "
                                  "was applied; add a new version instead of editing an applied one")
            continue
        for statement in migration.statements(database):
            client.command(statement)
        client.insert(f"`{database}`.schema_migrations", [[migration.version, migration.name, migration.checksum]],
                      column_names=["version", "name", "checksum"])
        done.append(migration.version)
    return done
