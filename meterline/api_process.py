"""``meterline run api``: the api (api/server.py, api/main.py) with the composition root's hooks added — work that
belongs in the api process but needs layers the api may not import (``api`` sits below ``meterline``).

Hooks: the reconciliation of the four usage records when this api owns an embedded ClickHouse
(meterline/reconcile_embedded.py)."""

from __future__ import annotations

from fastapi import FastAPI

from api import server
from api.main import create_app as create_api
from meterline.reconcile_embedded import EmbeddedReconciliation


def create_app() -> FastAPI:
    return create_api(hooks=[EmbeddedReconciliation.from_settings()])


def main() -> None:
    server.main(factory="meterline.api_process:create_app")
