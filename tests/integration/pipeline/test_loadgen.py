"""`meterline loadgen` against a real API, streams worker and ledger: it finds or creates the meter of its
type, and its report (accepted / dead-lettered / charged) comes from the pipeline, not from the API's 202s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pipeline_harness import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))  # the shared ingest test kit
from ingest_testkit import Tenant, make_app, new_tenant, serve

pytestmark = pytest.mark.integration


@pytest.fixture
def server(pipeline: Pipeline) -> Iterator[str]:
    app = make_app(pipeline.database_url, bootstrap=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    with serve(app) as base_url:
        yield base_url


def _loadgen(pipeline: Pipeline, server: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterline", "loadgen", "--url", server, "--rate", "5000",
                           "--wallets", "7", "--max-events", "400", "--batch-size", "100", "--settle-s", "90",
                           *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **pipeline.env, "METERLINE_API_KEY": key})


def _row(stdout: str) -> list[int]:
    """The figures of the report table's data row: sent, accepted, dead-lettered, charged, credits, unaccounted."""
    rows = [[int(n) for n in re.findall(r"-?\d+", line)] for line in stdout.splitlines() if line.count("│") >= 6]
    (row,) = [r for r in rows if len(r) == 6]
    return row


def test_loadgen_creates_its_meter_and_reports_charges_from_the_pipeline(pipeline: Pipeline, server: str) -> None:
    pipeline.start("streams")
    pipeline.start("ledger")
    with httpx.Client(base_url=server, timeout=30) as http:
        tenant: Tenant = new_tenant(http, keys={"ingest": ["ingest"], "reader": ["ingest", "read"],
                                                "admin": ["ingest", "admin"]})
        # a key that cannot create a meter is told which meters exist and exits before sending anything
        asked = _loadgen(pipeline, server, tenant.keys["reader"], "--type", "llm.tokens")
        assert asked.returncode == 2, asked.stderr
        assert "no meter" in asked.stderr and "llm.tokens" in asked.stderr

        done = _loadgen(pipeline, server, tenant.keys["admin"], "--type", "llm.tokens")
        assert done.returncode == 0, done.stderr + done.stdout
        assert "created meter loadgen-llm-tokens" in done.stderr
        sent, accepted, dead, charged, credits, unaccounted = _row(done.stdout)
        assert (sent, accepted, dead, charged, unaccounted) == (400, 400, 0, 400, 0)
        # tokens 1..100 cycling: 4 × 5050 tokens at 0.01 credit each, priced cumulatively per wallet
        assert 0 < credits <= 202

        # every event dead-lettered (the project refuses unknown subjects): reported, and loadgen FAILS
        r = http.put(f"/api/v1/projects/{tenant.project_id}/metering-policy",
                     json={"unknown_subjects": "dead_letter"}, headers=tenant.owner_headers)
        assert r.status_code == 200, r.text
        pipeline_wait = _loadgen(pipeline, server, tenant.keys["reader"], "--type", "llm.tokens",
                                 "--max-events", "300")
    assert pipeline_wait.returncode == 1, pipeline_wait.stderr + pipeline_wait.stdout
    assert _row(pipeline_wait.stdout)[:4] == [300, 300, 300, 0]
    assert "unknown_subject: 300" in pipeline_wait.stderr and "nothing was charged" in pipeline_wait.stderr
