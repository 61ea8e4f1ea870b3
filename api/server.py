"""Process entry point for `meterline run api`."""

from __future__ import annotations

import uvicorn

from api.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run("api.main:create_app", factory=True, host=settings.host, port=settings.port,
                log_config=None, access_log=False)
