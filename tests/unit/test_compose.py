"""docker-compose.yml cannot be started here (no Docker engine), so it is checked by parsing: every process
the code runs has a service built from the one Dockerfile, and every setting the processes need is set."""

from __future__ import annotations

from pathlib import Path

import pytest
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


# --------------------------------------------------------------------------- metrics: Prometheus and Grafana

def _metrics_port_settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, int]]:
    """process -> (its port variable, the port its component's settings read from the service's environment)."""
    from analytics.settings import AnalyticsSettings
    from ledger.settings import LedgerSettings
    from meterline.stack import PROBE_PORT_SETTINGS
    from streams.settings import StreamsSettings

    services = _compose()["services"]
    read = {"ledger": lambda: LedgerSettings().metrics_port,
            "scheduler": lambda: LedgerSettings().scheduler_metrics_port,
            "streams": lambda: StreamsSettings().metrics_port,
            "analytics": lambda: AnalyticsSettings().metrics_port}
    out = {}
    for name, variable in PROBE_PORT_SETTINGS.items():
        with monkeypatch.context() as patch:
            for key, value in services[name]["environment"].items():
                if not str(value).startswith("${"):
                    patch.setenv(key, str(value))
            out[name] = (variable, read[name]())
    return out


def _scrape_targets() -> dict[str, list[str]]:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets: dict[str, list[str]] = {}
    for job in config["scrape_configs"]:
        found = [t for static in job.get("static_configs", []) for t in static["targets"]]
        found += [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
        targets[job["job_name"]] = found
    return targets


def test_every_process_serves_metrics_on_a_port_prometheus_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _compose()["services"]
    targets = _scrape_targets()
    assert set(PROCESSES) <= set(targets), f"no scrape job for {set(PROCESSES) - set(targets)}"
    api_port = services["api"]["environment"]["API_PORT"]
    assert targets["api"] == [f"api:{api_port}"]
    for name, (variable, port) in _metrics_port_settings(monkeypatch).items():
        env = services[name]["environment"]
        assert env[variable] == str(port), f"{name} reads {variable}"
        assert env["METERLINE_METRICS_HOST"] == "0.0.0.0", f"{name}'s probes must listen beyond localhost"
        assert targets[name] == [f"{name}:{port}"], (name, targets[name])
        assert f":{port}/health" in " ".join(services[name]["healthcheck"]["test"]), f"{name} health check"


def test_prometheus_and_grafana_services_mount_the_provisioned_files() -> None:
    services = _compose()["services"]
    prometheus = services["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"] if m.startswith("./")}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert set(PROCESSES) <= set(prometheus["depends_on"])
    grafana = services["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"].removeprefix("./")
    dashboards = ROOT / mounts["/var/lib/grafana/dashboards"].removeprefix("./")
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "meterline.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (dashboards / "meterline.json").exists()
    assert "prometheus" in grafana["depends_on"]


def _defined_metric_names() -> set[str]:
    """Every sample name the components define (imports register them in the default registry)."""
    import importlib

    from prometheus_client import REGISTRY

    for module in ("ledger.metrics", "streams.metrics", "analytics.metrics", "api.metrics"):
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_the_dashboard_uses_its_datasource_and_only_metrics_meterline_defines() -> None:
    import json
    import re

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "meterline.json").read_text())
    datasource_uid = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" /
                                     "prometheus.yml").read_text())["datasources"][0]["uid"]
    defined = _defined_metric_names()
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(meterline_[a-z_]+)\b", target["expr"]))
    assert used, "the dashboard queries no Meterline metric"
    assert used <= defined, f"the dashboard queries metrics nothing defines: {sorted(used - defined)}"
    # the list: each has a panel
    for needed in ("meterline_ingest_events_accepted_total", "meterline_ingest_events_rejected_total",
                   "meterline_dead_letters_total", "meterline_consumer_lag_messages",
                   "meterline_ledger_checkpoint_emit_to_apply_seconds_bucket",
                   "meterline_ledger_checkpoint_queue_seconds_bucket", "meterline_ledger_apply_seconds_bucket",
                   "meterline_outbox_backlog_rows", "meterline_webhook_deliveries_total",
                   "meterline_scheduler_job_runs_total", "meterline_debit_seconds_bucket",
                   "meterline_invariant_check_violations"):
        assert needed in used, f"no dashboard panel shows {needed}"


def test_the_reconciliation_alert_rules_parse_are_mounted_and_name_metrics_the_code_defines() -> None:
    import re

    from prometheus_client import REGISTRY

    import ledger.metrics  # noqa: F401  (defines the gauges)

    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules/reconciliation.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert any("meterline_reconciliation_drift_wallets" in e and "> 0" in e for e in exprs)
    known = {name for metric in REGISTRY.collect() for name in [metric.name]}
    for expr in exprs:
        for name in re.findall(r"meterline_[a-z_]+", expr):
            assert name in known, name
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in _compose()["services"]["prometheus"]["volumes"]
