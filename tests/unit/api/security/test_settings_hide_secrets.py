"""Security item 4 (issue 14): a refused setting never prints its input — secrets included — at start-up."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from analytics.settings import AnalyticsSettings
from api.ingest.settings import IngestSettings
from api.settings import ApiSettings, IdempotencySettings
from api.tenancy.email_settings import EmailDeliverySettings
from ledger.settings import LedgerSettings
from meterline.settings import StackSettings
from streams.settings import StreamsSettings

SECRET = "whsec_" + "Zx9" * 8  # what must never appear in the error text
COMPONENT_SETTINGS: tuple[type[BaseSettings], ...] = (
    ApiSettings, IdempotencySettings, EmailDeliverySettings, IngestSettings, LedgerSettings, StreamsSettings,
    AnalyticsSettings, StackSettings)


def test_a_refused_api_setting_does_not_print_the_jwt_or_webhook_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # from the environment, as at a real start-up: pydantic would print the whole input (every API_ variable)
    monkeypatch.setenv("API_ENV", "production")
    monkeypatch.setenv("API_ERASURE_PSEUDONYM_KEY", "5e1f0c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d")
    monkeypatch.setenv("API_JWT_SECRET", "short")
    monkeypatch.setenv("API_STRIPE_WEBHOOK_SECRET", "whsec_1")
    with pytest.raises(ValidationError) as refused:
        ApiSettings()
    text = str(refused.value)
    assert "API_JWT_SECRET" in text  # the reason is still told
    assert "input_value" not in text and "whsec_1" not in text and "'short'" not in text, text


@pytest.mark.parametrize("cls", COMPONENT_SETTINGS, ids=lambda c: c.__name__)
def test_every_component_settings_hides_input_values(cls: type[BaseModel]) -> None:
    int_fields = [name for name, f in cls.model_fields.items() if f.annotation is int]
    assert int_fields, cls
    with pytest.raises(ValidationError) as refused:
        cls.model_validate({int_fields[0]: SECRET})
    assert SECRET not in str(refused.value), str(refused.value)
