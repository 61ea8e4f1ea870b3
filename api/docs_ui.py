"""``/docs`` that works offline, under a strict CSP, with an Authorize button.

- Swagger UI's assets are served from the installed ``swagger-ui-py`` wheel (Swagger UI 5, which renders the
  OpenAPI 3.1 documents FastAPI writes); no CDN. The page and its start-up script are ours
  (``api/docs_static``): no inline script, so the CSP needs no ``unsafe-inline`` for scripts.
- The OpenAPI declares two security schemes, both sent as ``Authorization: Bearer``: ``userToken`` (a JWT
  from /api/v1/auth/login) and ``apiKey`` (an ``mlk_...`` project key). Every operation requires one of them
  except the public ones (sign-up, login, refresh, logout, health, payment webhooks, the docs themselves).
- FastAPI's ReDoc page loads from a CDN: it is switched off rather than left blank offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["DOCS_CSP", "install_docs"]

_OWN = Path(__file__).parent / "docs_static"
#: what the Swagger UI bundle needs: its own scripts and styles, inline style attributes it sets, data: images
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"}
_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")

SECURITY_SCHEMES: dict[str, Any] = {
    "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                  "description": "an access token from POST /api/v1/auth/login (or signup); 15 minutes, renew "
                                 "with POST /api/v1/auth/refresh"},
    "apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "mlk_...",
               "description": "a project API key (POST /api/v1/projects/{project_id}/api-keys), scopes "
                              "ingest / read / admin"},
}
_PUBLIC_PREFIXES = ("/api/v1/auth/signup", "/api/v1/auth/login", "/api/v1/auth/refresh", "/api/v1/auth/logout",
                    "/api/v1/webhooks/", "/healthz", "/readyz", "/docs", "/openapi.json", "/dashboard")


def _swagger_dir() -> Path:
    import swagger_ui

    return Path(swagger_ui.__file__).parent / "static"


def openapi_with_security(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        public = path.startswith(_PUBLIC_PREFIXES)
        for operation in operations.values():
            if isinstance(operation, dict):
                operation["security"] = [] if public else [{"userToken": []}, {"apiKey": []}]
    app.openapi_schema = schema
    return schema


def install_docs(app: FastAPI) -> None:
    """Call on an app created with ``docs_url=None, redoc_url=None``."""
    swagger = _swagger_dir()
    missing = [name for name in _ASSETS if not (swagger / name).is_file()]
    if missing:  # a broken install is loud at start, not a blank page later
        raise RuntimeError(f"swagger-ui-py is missing {missing} in {swagger}")
    app.openapi = lambda: openapi_with_security(app)  # type: ignore[method-assign]
    app.mount("/docs/assets", StaticFiles(directory=swagger), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse((_OWN / "index.html").read_text(), headers=_HEADERS)

    @app.get("/docs/init.js", include_in_schema=False)
    def docs_init() -> FileResponse:
        return FileResponse(_OWN / "init.js", media_type="text/javascript", headers=_HEADERS)
