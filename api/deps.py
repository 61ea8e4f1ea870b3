"""Shared FastAPI dependencies: settings and database connections.

Resources live on ``app.state`` (built in the lifespan), never in module globals, so tests can build as
many apps as they like against different databases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Connection, Engine

from api.settings import ApiSettings


def get_app_settings(request: Request) -> ApiSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def get_connection(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Connection]:
    """A connection in a transaction that commits when the request succeeds."""
    with engine.begin() as conn:
        yield conn


SettingsDep = Annotated[ApiSettings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
# scope="function": commit BEFORE the response is sent, so a failed commit is a 5xx, never a 2xx for
# work that was rolled back (FastAPI's default runs the exit after the response is built).
ConnectionDep = Annotated[Connection, Depends(get_connection, scope="function")]
