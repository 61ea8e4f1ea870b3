"""Process entry point for `meterline run api`."""

from __future__ import annotations

import uvicorn

from api.settings import get_settings


def main(factory: str = "api.main:create_app") -> None:
    """``factory``: the app factory uvicorn imports (``meterline run api`` passes meterline/api_process.py's, which
    adds the composition root's hooks)."""
    settings = get_settings()
    uvicorn.run(factory, factory=True, host=settings.host, port=settings.port,
                log_config=None, access_log=False)
