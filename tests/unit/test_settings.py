"""Settings are read lazily, one prefix per component, shared infrastructure without a prefix, and
placeholder secrets are refused outside local mode."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.settings import ApiSettings
from ledger.settings import LedgerSettings


def test_shared_infrastructure_comes_from_unprefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.example/x")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    monkeypatch.setenv("LEDGER_CONSUMER_GROUP", "custom-group")
    ledger = LedgerSettings()
    api = ApiSettings()
    assert ledger.database_url == api.database_url == "postgresql://u@db.example/x"
    assert ledger.kafka_bootstrap_servers == api.kafka_bootstrap_servers == "broker:9092"
    assert ledger.consumer_group == "custom-group"


def test_settings_are_not_read_at_import_time(monkeypatch: pytest.MonkeyPatch, clear_settings_caches: None) -> None:
    from ledger import settings as ledger_settings

    monkeypatch.setenv("DATABASE_URL", "postgresql://first@h/db")
    assert ledger_settings.get_settings().database_url == "postgresql://first@h/db"
    monkeypatch.setenv("DATABASE_URL", "postgresql://second@h/db")
    ledger_settings.get_settings.cache_clear()
    assert ledger_settings.get_settings().database_url == "postgresql://second@h/db"


REAL_ERASURE_KEY = "5e1f0c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d"


@pytest.mark.parametrize("secret", ["dev-secret", "changethis", "", "meterline-local-development-secret-do-not-use",
                                    "9f8e7d6c5b4a3928"])  # the last: real-looking but only 16 bytes
def test_placeholder_secrets_are_refused_in_production(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("METERLINE_ENV", "production")
    monkeypatch.setenv("API_ERASURE_PSEUDONYM_KEY", REAL_ERASURE_KEY)
    monkeypatch.setenv("API_JWT_SECRET", secret)
    with pytest.raises(ValidationError, match="API_JWT_SECRET"):
        ApiSettings()


def test_real_secrets_are_accepted_in_production_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ENV", "production")
    monkeypatch.setenv("API_JWT_SECRET", "9f8e7d6c5b4a39281706f5e4d3c2b1a0")
    monkeypatch.setenv("API_ERASURE_PSEUDONYM_KEY", REAL_ERASURE_KEY)
    settings = ApiSettings()
    assert settings.jwt_secret.get_secret_value() == "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    assert "9f8e7d6c" not in repr(settings) and REAL_ERASURE_KEY[:8] not in repr(settings)


@pytest.mark.parametrize("key", ["changethis", "meterline-local-erasure-pseudonym-key-do-not-use", "0123456789abcdef"])
def test_the_erasure_pseudonym_key_must_be_real_in_production(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("METERLINE_ENV", "production")
    monkeypatch.setenv("API_JWT_SECRET", "9f8e7d6c5b4a39281706f5e4d3c2b1a0")
    monkeypatch.setenv("API_ERASURE_PSEUDONYM_KEY", key)
    with pytest.raises(ValidationError, match="API_ERASURE_PSEUDONYM_KEY"):
        ApiSettings()


def test_placeholders_are_fine_in_local_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_ENV", raising=False)
    monkeypatch.delenv("API_JWT_SECRET", raising=False)
    assert ApiSettings().env == "local"
