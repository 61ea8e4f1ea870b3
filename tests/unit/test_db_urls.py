from __future__ import annotations

import pytest

from ledger.db import libpq_url, sqlalchemy_url


@pytest.mark.parametrize("url", [
    "postgres://u:p@h:5432/db",
    "postgresql://u:p@h:5432/db",
    "postgresql+psycopg://u:p@h:5432/db",
])
def test_every_postgres_spelling_is_driven_through_psycopg3(url: str) -> None:
    assert sqlalchemy_url(url) == "postgresql+psycopg://u:p@h:5432/db"
    assert libpq_url(url) == "postgresql://u:p@h:5432/db"


def test_embedded_socket_urls_survive() -> None:
    url = "postgresql://postgres:@/meterline?host=/tmp/x/pg"
    assert libpq_url(url) == url


def test_a_non_postgres_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must be a PostgreSQL URL"):
        sqlalchemy_url("mysql://u@h/db")
