"""The catalog against real PostgreSQL: versioned meters, immutable price versions, subject keys, policies,
and the snapshot the worker meters with."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, text

from ledger.db import make_engine
from streams import catalog
from streams.catalog_model import ProjectPolicy, auto_wallet_id
from streams.errors import CatalogConflict, CatalogInvalid, CatalogNotFound

pytestmark = pytest.mark.integration
DEFAULT = ProjectPolicy("auto_provision", 3600)
PER_TOKEN = {"model": "per_unit", "unit_price_minor": "0.4"}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=2)
    yield engine
    engine.dispose()


def test_meters_keep_their_history_and_one_current_version(engine: Engine) -> None:
    with engine.begin() as conn:
        m = catalog.create_meter(conn, project_id="p1", slug="tokens", event_type="llm", aggregation="sum",
                                 value_property="$.tokens", group_by=["$.model"])
        v2 = catalog.update_meter(conn, project_id="p1", meter="tokens",
                                  filters=[{"property": "$.model", "equals": "gpt-4"}])
        assert (v2.id, v2.version, v2.aggregation) == (m.id, 2, "SUM")
        assert [h.version for h in catalog.meter_history(conn, project_id="p1", meter=m.id)] == [1, 2]
        assert [x.version for x in catalog.list_meters(conn, project_id="p1")] == [2]
        with pytest.raises(CatalogConflict):
            catalog.create_meter(conn, project_id="p1", slug="tokens", event_type="x", aggregation="COUNT")
        catalog.create_meter(conn, project_id="p2", slug="tokens", event_type="llm", aggregation="COUNT")
        with pytest.raises(CatalogInvalid):
            catalog.create_meter(conn, project_id="p1", slug="bad", event_type="llm", aggregation="SUM")
        with pytest.raises(CatalogInvalid):
            catalog.create_meter(conn, project_id="p1", slug="bad", event_type="llm", aggregation="SUM",
                                 value_property="$.a[x]")
        archived = catalog.archive_meter(conn, project_id="p1", meter="tokens")
        assert archived.archived_at is not None
        assert catalog.list_meters(conn, project_id="p1") == []
        # the slug is free again once archived
        catalog.create_meter(conn, project_id="p1", slug="tokens", event_type="llm", aggregation="COUNT")


def test_price_versions_are_immutable_and_ordered(engine: Engine) -> None:
    with engine.begin() as conn:
        catalog.create_meter(conn, project_id="p1", slug="tokens", event_type="llm", aggregation="SUM",
                             value_property="$.tokens")
        price = catalog.create_price(conn, project_id="p1", meter="tokens", model=PER_TOKEN,
                                     effective_from=datetime(2026, 1, 1, tzinfo=UTC))
        with pytest.raises(CatalogConflict):
            catalog.create_price(conn, project_id="p1", meter="tokens", model=PER_TOKEN)
        with pytest.raises(CatalogInvalid):
            catalog.add_price_version(conn, project_id="p1", price_id=price.id, model=PER_TOKEN,
                                      effective_from=datetime(2025, 1, 1, tzinfo=UTC))
        with pytest.raises(CatalogInvalid):
            catalog.add_price_version(conn, project_id="p1", price_id=price.id,
                                      model={"model": "per_unit", "unit_price_minor": 0.5})  # a float price
        updated = catalog.add_price_version(conn, project_id="p1", price_id=price.id,
                                            model={"model": "per_unit", "unit_price_minor": "1"}, period="day")
        assert [(v.version, v.period) for v in updated.versions] == [(1, "month"), (2, "day")]
    with engine.begin() as conn, pytest.raises(sqlalchemy.exc.DBAPIError, match="immutable"):
        conn.execute(text("UPDATE price_versions SET period = 'day'"))
    with engine.begin() as conn, pytest.raises(CatalogNotFound):
        catalog.add_price_version(conn, project_id="other", price_id=price.id, model=PER_TOKEN)


def test_subject_keys_and_policies_and_the_worker_snapshot(engine: Engine) -> None:
    with engine.begin() as conn:
        before = catalog.catalog_revision(conn)
        m = catalog.create_meter(conn, project_id="p1", slug="tokens", event_type="llm", aggregation="SUM",
                                 value_property="$.usage.tokens")
        catalog.create_price(conn, project_id="p1", meter="tokens", model=PER_TOKEN)
        catalog.set_subject_key(conn, project_id="p1", subject="alice", wallet_id="w-1")
        catalog.set_subject_key(conn, project_id="p1", subject="alice-2", wallet_id="w-1")
        assert catalog.set_subject_key(conn, project_id="p1", subject="alice", wallet_id="w-1").wallet_id == "w-1"
        with pytest.raises(CatalogConflict):
            catalog.set_subject_key(conn, project_id="p1", subject="alice", wallet_id="w-2")
        assert catalog.set_subject_key(conn, project_id="p1", subject="bob").wallet_id == auto_wallet_id("p1", "bob")
        assert [k.subject for k in catalog.list_subject_keys(conn, project_id="p1", wallet_id="w-1")] == [
            "alice", "alice-2"]
        catalog.delete_subject_key(conn, project_id="p1", subject="bob")
        catalog.set_project_settings(conn, project_id="p1", unknown_subjects="dead_letter")
        settings = catalog.get_project_settings(conn, project_id="p1", default=DEFAULT)
        assert (settings.unknown_subjects, settings.allowed_lateness_s) == ("dead_letter", 3600)
        snap = catalog.load_catalog(conn, default_policy=DEFAULT)
        assert catalog.catalog_revision(conn) > before
    [meter] = snap.meters_by_type[("p1", "llm")]
    assert (meter.id, meter.value_steps) == (m.id, ("usage", "tokens"))
    version = snap.price_at(m.id, datetime.now(UTC) + timedelta(days=1))
    assert version is not None and version.model.unit_price_minor == Decimal("0.4")
    assert snap.wallets_by_subject == {("p1", "alice"): "w-1", ("p1", "alice-2"): "w-1"}
    assert snap.policy("p1").unknown_subjects == "dead_letter"
    assert snap.policy("p9") == DEFAULT
