"""Security item 8 (issue 14): schemathesis over the WHOLE OpenAPI of the running API, with an owner's token.

Every operation gets generated requests (valid and invalid); each answer must not be a 5xx and must match the
schema the OpenAPI documents for its status. Bounded: ``MAX_EXAMPLES`` per operation (≈ 2 minutes here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import response_schema_conformance
from tenancy_testkit import create_project, signup

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 3


@contextmanager
def served_api(database_url: str, engines: Any, topics: Any, tmp_path: Path) -> Iterator[str]:
    """The real app under uvicorn, with the test's topics and a ClickHouse of its own (every router works)."""
    import tenancy_testkit

    from analytics.settings import AnalyticsSettings
    from api.main import create_app

    def app_with_analytics(api_settings: Any) -> Any:
        app = create_app(api_settings)
        app.state.analytics_settings = AnalyticsSettings(clickhouse_url=f"chdb://{(tmp_path / 'ch').resolve()}",
                                                         embedded_sink_owner="none")
        return app

    original = tenancy_testkit.create_app
    tenancy_testkit.create_app = app_with_analytics  # type: ignore[assignment]
    try:
        with tenancy_testkit.live_server(database_url, engines, topic_prefix=topics.prefix) as url:
            yield url
    finally:
        tenancy_testkit.create_app = original


def test_no_operation_answers_5xx_or_breaks_its_schema(database_url: str, engines: Any, topics: Any,
                                                       tmp_path: Path) -> None:
    with served_api(database_url, engines, topics, tmp_path) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            owner = signup(http, "owner")  # type: ignore[arg-type]
            project = create_project(http, owner)  # type: ignore[arg-type]
            raw = http.get("/openapi.json").json()
        schema = schemathesis.openapi.from_dict(raw)
        schema.config.update(base_url=url)
        failures: list[str] = []
        statuses: dict[int, int] = {}
        operations = 0
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1

            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def run(case: Any) -> None:
                if "project_id" in (case.path_parameters or {}):
                    case.path_parameters["project_id"] = project  # the owner's project: reach the handlers
                response = case.call(headers={"Authorization": f"Bearer {owner.access_token}"}, timeout=30)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                where = f"{case.method} {case.formatted_path} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{where}: {response.text[:300]}")
                    return
                try:
                    case.validate_response(response, checks=[response_schema_conformance])
                except Exception as exc:
                    failures.append(f"{where}: {str(exc)[:300]}")

            run()
        print(f"{operations} operations, answers by status: {dict(sorted(statuses.items()))}")
        assert operations > 100 and sum(statuses.values()) >= operations
        assert sum(n for code, n in statuses.items() if code < 300) > 0.1 * operations  # handlers were reached
        assert not failures, "\n".join(sorted(set(failures))[:40])
