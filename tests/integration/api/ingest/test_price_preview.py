"""The price preview: what N units cost under a model or an existing price, by the ledger's own pricing."""

from __future__ import annotations

from typing import Any

import pytest
from tenancy_testkit import api_client, five_users, team

pytestmark = pytest.mark.integration


def test_price_preview_uses_the_ledger_pricing(database_url: str, engines: Any) -> None:
    with api_client(database_url, engines) as client:
        users = five_users(client)
        t = team(client, users)
        owner = users["owner"].headers
        p = f"/api/v1/projects/{t.project_id}"
        graduated = {"model": "graduated", "tiers": [{"up_to": "1000", "unit_price_minor": "0"},
                                                     {"up_to": None, "unit_price_minor": "0.3"}]}
        r = client.post(f"{p}/prices/preview", json={"model": graduated, "units": "2501"},
                        headers=users["viewer"].headers)
        assert r.status_code == 200, r.text
        assert r.json()["amount_minor"] == 450 and r.json()["exact_minor"].startswith("450.3")  # 1501 * 0.3, floored
        assert client.post(f"{p}/meters", json={"slug": "tokens", "event_type": "llm.tokens",
                                                "value_property": "$.tokens"}, headers=owner).status_code == 201
        price = client.post(f"{p}/prices", json={"meter": "tokens", "model": {"model": "package",
                            "package_size": "100", "package_price_minor": "7"}}, headers=owner).json()
        r = client.post(f"{p}/prices/preview", json={"price_id": price["id"], "units": "201"}, headers=owner)
        assert r.status_code == 200 and r.json()["amount_minor"] == 21, r.text  # three started packages
        bad = client.post(f"{p}/prices/preview", json={"model": {"model": "per_unit"}, "units": "1"}, headers=owner)
        assert bad.status_code == 422 and "price model" in bad.json()["detail"]
        both = client.post(f"{p}/prices/preview", json={"units": "1"}, headers=owner)
        assert both.status_code == 422
