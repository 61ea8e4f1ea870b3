"""The dashboard: plain HTML pages + one small script + Chart.js served locally (no CDN, no build step).

Pages are public shells; every figure comes from the authenticated JSON API. The browser keeps the access
token from POST /api/v1/auth/login in sessionStorage (gone when the tab closes) and sends it as a Bearer
header, so the pages need no cookie and are not exposed to CSRF."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from api.errors import NotFound

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)

HERE = Path(__file__).parent
PAGES_DIR = HERE / "pages"
STATIC_DIR = HERE / "static"

#: page slug -> title shown in the navigation (order = navigation order). "login" is not in the navigation.
PAGES: dict[str, str] = {
    "usage": "Usage",
    "credits": "Credit flow",
    "wallets": "Wallets",
    "paywall": "Paywall funnel",
    "billing": "Billing runs",
    "audit": "Audit log",
    "dead-letters": "Dead letters",
}
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".md": "text/plain"}
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"}


def _render(slug: str) -> str:
    shell = (PAGES_DIR / "_shell.html").read_text()
    body = (PAGES_DIR / f"{slug}.html").read_text()
    nav = "".join(f'<a href="/dashboard/{s}" data-nav="{s}">{t}</a>' for s, t in PAGES.items())
    title = PAGES.get(slug, "Sign in")
    return shell.replace("{{title}}", title).replace("{{page}}", slug).replace("{{nav}}", nav) \
        .replace("{{body}}", body)


@router.get("")
def dashboard_root() -> RedirectResponse:
    return RedirectResponse("/dashboard/usage", status_code=307)


@router.get("/static/{name:path}")
def static(name: str) -> FileResponse:
    path = (STATIC_DIR / name).resolve()
    if STATIC_DIR.resolve() not in path.parents or path.suffix not in _STATIC_TYPES or not path.is_file():
        raise NotFound("no such dashboard asset")
    return FileResponse(path, media_type=_STATIC_TYPES[path.suffix],
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


@router.get("/{slug}", response_class=HTMLResponse)
def page(slug: str) -> HTMLResponse:
    if slug != "login" and slug not in PAGES:
        raise NotFound("no such dashboard page")
    return HTMLResponse(_render(slug), headers=_HEADERS)
