"""api/README.md's provider × event table is the handlers' registry, rendered: never edited by hand."""

from __future__ import annotations

import api.payments.handlers  # noqa: F401  (registers every handler)
from api.payments import registry
from api.payments.handlers import HANDLERS


def test_the_readme_table_is_generated_from_the_registry() -> None:
    readme = registry.README.read_text()
    assert registry.readme_with_table(readme) == readme, (
        "api/README.md's payments table differs from the handlers' registry: run "
        "`python -m api.payments.registry --write`")


def test_every_provider_dispatches_through_the_registry() -> None:
    assert set(HANDLERS) == set(registry.PROVIDERS)
    for provider in registry.PROVIDERS:
        assert registry.REGISTRY[provider], provider
        for spec in registry.REGISTRY[provider].values():
            assert spec.credits and spec.entitlement
    # the table names every registered event once
    table = registry.effects_table()
    for provider, events in registry.REGISTRY.items():
        for event_type in events:
            assert table.count(f"`{event_type}`") == 1, (provider, event_type)
