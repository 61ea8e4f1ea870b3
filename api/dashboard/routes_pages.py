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

#: page slug -> title shown in the navigation, by group (order = navigation order).
NAV: dict[str, dict[str, str]] = {
    "Analytics": {"usage": "Usage", "credits": "Credit flow", "paywall": "Paywall funnel",
                  "dead-letters": "Dead letters", "reconciliation": "Reconciliation"},
    "Manage": {"wallets": "Wallets", "meters": "Meters", "prices": "Prices", "feature-costs": "Feature costs",
               "offers": "Packs & plans", "billing": "Billing rules", "api-keys": "API keys",
               "subject-keys": "Subject keys", "team": "Team", "audit": "Audit log"},
}
PAGES: dict[str, str] = {slug: title for group in NAV.values() for slug, title in group.items()}
#: pages for the signed-out (no navigation, no project)
PUBLIC_PAGES: dict[str, str] = {"login": "Sign in", "signup": "Create an account"}
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".md": "text/plain"}
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"}


def _render(slug: str) -> str:
    shell = (PAGES_DIR / "_shell.html").read_text()
    body = (PAGES_DIR / f"{slug}.html").read_text()
    nav = "".join(f'<span class="nav-group"><small>{group}</small>'
                  + "".join(f'<a href="/dashboard/{s}" data-nav="{s}">{t}</a>' for s, t in pages.items())
                  + "</span>" for group, pages in NAV.items())
    title = PAGES.get(slug) or PUBLIC_PAGES[slug]
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
    if slug not in PUBLIC_PAGES and slug not in PAGES:
        raise NotFound("no such dashboard page")
    return HTMLResponse(_render(slug), headers=_HEADERS)
