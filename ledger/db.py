"""Engine construction for every component that talks to PostgreSQL.

The URL may come from ``DATABASE_URL`` in any of the usual spellings (``postgres://``, ``postgresql://``,
``postgresql+psycopg://``); SQLAlchemy is always driven through psycopg 3."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine


def sqlalchemy_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver named, whatever scheme it came with."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"DATABASE_URL must be a PostgreSQL URL (postgresql://...), got {url.split(':', 1)[0]}://")


def libpq_url(url: str) -> str:
    """Return ``url`` as plain libpq understands it (for psycopg.connect and pg tools)."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]


def make_engine(url: str, *, pool_size: int = 10, application_name: str = "meterline", pre_ping: bool = True,
                recycle_s: int = 1800) -> Engine:
    """A pooled engine. ``pre_ping`` costs a round trip per checkout; the API turns it off (its hot path is
    two round trips) and relies on ``recycle_s`` plus invalidation on a connection error instead: after a
    database restart the first request per pooled connection fails once, then the pool reconnects."""
    return create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=recycle_s,
        connect_args={"application_name": application_name},
    )
