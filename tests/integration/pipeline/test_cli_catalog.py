"""`meterline meters|prices|subjects` against a real database (the same catalog the worker reads)."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from meterline.cli import app

pytestmark = pytest.mark.integration


def test_catalog_commands_round_trip(database_url: str) -> None:
    runner = CliRunner()
    env = {"DATABASE_URL": database_url}

    def run(*args: str, code: int = 0) -> object:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, result.output
        return orjson.loads(result.stdout) if code == 0 else result.output

    meter = run("meters", "create", "-p", "p1", "--slug", "tokens", "--event-type", "llm", "--value-property",
                "$.tokens", "--filter", '{"property": "$.model", "in": ["a", "b"]}')
    assert meter["version"] == 1 and meter["filters"] == [{"property": "$.model", "in": ["a", "b"]}]
    hint = " ".join(runner.invoke(app, ["meters", "create", "-p", "p1", "--slug", "calls", "--event-type", "api",
                                        "--aggregation", "COUNT"],
                                  env=env).stderr.split())
    assert "meter 'calls' has no price yet" in hint and "meterline prices create -p p1 --meter calls" in hint
    assert run("meters", "update", "-p", "p1", "tokens", "--aggregation", "max")["version"] == 2
    assert [m["version"] for m in run("meters", "history", "-p", "p1", "tokens")] == [1, 2]
    price = run("prices", "create", "-p", "p1", "--meter", "tokens", "--unit-price", "0.4",
                "--effective-from", "2026-01-01T00:00:00Z")
    later = run("prices", "add-version", "-p", "p1", price["id"], "--model",
                '{"model": "package", "package_size": "1000", "package_price_minor": "5"}')
    assert [v["model"]["model"] for v in later["versions"]] == ["per_unit", "package"]
    assert "catalog.invalid" in run("prices", "add-version", "-p", "p1", price["id"], "--unit-price", "1",
                                    "--effective-from", "2025-01-01T00:00:00Z", code=1)
    assert run("subjects", "set", "-p", "p1", "alice", "--wallet", "w1")["wallet_id"] == "w1"
    assert "catalog.conflict" in run("subjects", "set", "-p", "p1", "alice", "--wallet", "w2", code=1)
    assert [k["subject"] for k in run("subjects", "list", "-p", "p1")] == ["alice"]
    assert run("subjects", "policy", "-p", "p1", "--unknown-subjects", "dead_letter")["unknown_subjects"] == "dead_letter"
    assert run("subjects", "policy", "-p", "p1")["unknown_subjects"] == "dead_letter"
    assert run("meters", "archive", "-p", "p1", "tokens")["archived_at"] is not None
    assert [m["slug"] for m in run("meters", "list", "-p", "p1")] == ["calls"]
