"""docker-compose.yml cannot be started here (no Docker engine), so it is checked by parsing: every process
the code runs has a service built from the one Dockerfile, and every setting the processes need is set."""

from __future__ import annotations

from pathlib import Path

import yaml

from meterline.stack import PROCESSES

ROOT = Path(__file__).resolve().parents[2]
INFRA = {"kafka", "postgres", "clickhouse"}


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _required_env() -> set[str]:
    """The shared infrastructure variables each component's settings read (their validation aliases)."""
    from api.settings import ApiSettings
    from ledger.settings import LedgerSettings

    names: set[str] = set()
    for model in (ApiSettings, LedgerSettings):
        for field_name in ("database_url", "kafka_bootstrap_servers"):
            alias = model.model_fields[field_name].validation_alias
            names.add(alias.choices[0])  # type: ignore[union-attr]
    names.add("CLICKHOUSE_URL")
    return names


def test_every_meterline_process_has_a_service_running_it() -> None:
    services = _compose()["services"]
    for name in PROCESSES:
        assert name in services, f"no compose service for process {name!r}"
        assert services[name]["command"] == ["run", name]
        assert services[name]["build"] == "."


def test_infrastructure_services_exist_with_health_checks_and_volumes() -> None:
    compose = _compose()
    for name in INFRA:
        service = compose["services"][name]
        assert "healthcheck" in service, f"{name} has no health check"
        assert service.get("volumes"), f"{name} keeps no data volume"
    assert compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_every_meterline_service_gets_the_settings_it_reads() -> None:
    services = _compose()["services"]
    required = _required_env() | {"METERLINE_ENV", "API_JWT_SECRET"}
    for name in [*PROCESSES, "init"]:
        env = services[name]["environment"]
        missing = required - set(env)
        assert not missing, f"service {name} lacks {sorted(missing)}"
        assert env["METERLINE_ENV"] == "production"
        assert "${API_JWT_SECRET:?" in env["API_JWT_SECRET"], "the JWT secret must be required, not defaulted"
        for var in ("KAFKA_BOOTSTRAP_SERVERS",):
            assert env[var].split(":")[0] in services, f"{name}.{var} points at no service"


def test_meterline_services_wait_for_topics_and_migrations() -> None:
    services = _compose()["services"]
    init = services["init"]
    assert init["command"][:2] == ["topics", "create"] and "--then-migrate" in init["command"]
    for dep in INFRA:
        assert init["depends_on"][dep]["condition"] == "service_healthy"
    for name in PROCESSES:
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
