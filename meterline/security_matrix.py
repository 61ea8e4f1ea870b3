"""What each role and API-key scope may do, read from the code: every project-scoped operation of the API with
the action its guard requires (``require_project(action)`` / ``require_project_deferred(action)``,
api/tenancy/auth.py), and the role/scope rules of that module.

Used twice, so the two cannot drift apart: the authorization-matrix test (tests/integration/api/security/
test_security_authz_matrix.py) checks every operation against it, and docs/security.md embeds its table
(``python -m meterline.security_matrix --write`` regenerates it; a test fails when the document's copy is
stale).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.tenancy.auth import KEY_SCOPES, MIN_ROLE, ROLE_RANK, role_allows, scopes_allow

ROLES = ("owner", "admin", "member", "viewer")
SCOPES = ("admin", "read", "ingest")
_GUARD = re.compile(r"^require_project(?:_deferred)?_(\w+)$")
#: operations whose handler refuses API keys outright, beyond the action (api/tenancy/auth.py ``people_only``)
PEOPLE_ONLY = frozenset({
    ("POST", "/api/v1/projects/{project_id}/members"),
    ("PATCH", "/api/v1/projects/{project_id}/members/{user_id}"),
    ("DELETE", "/api/v1/projects/{project_id}/members/{user_id}"),
    ("POST", "/api/v1/projects/{project_id}/invitations"),
    ("POST", "/api/v1/projects/{project_id}/invitations/{invitation_id}/resend"),
    ("DELETE", "/api/v1/projects/{project_id}/invitations/{invitation_id}"),
})


@dataclass(frozen=True, order=True)
class Operation:
    path: str
    method: str
    action: str
    summary: str

    def role_may(self, role: str) -> bool:
        return role_allows(role, self.action)

    def scope_may(self, scope: str) -> bool:
        return (self.method, self.path) not in PEOPLE_ONLY and scopes_allow(frozenset({scope}), self.action)


def _api_routes(routes: list[Any]) -> list[Any]:
    found: list[Any] = []
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router
            found.extend(_api_routes(route.original_router.routes))
        elif hasattr(route, "dependant"):
            found.append(route)
    return found


def _guard_action(dependant: Any) -> str | None:
    for sub in dependant.dependencies:
        match = _GUARD.match(getattr(sub.call, "__name__", ""))
        if match:
            return match.group(1)
        found = _guard_action(sub)
        if found:
            return found
    return None


def project_operations(app: Any) -> list[Operation]:
    """Every documented operation under ``/projects/{project_id}`` with its guard's action. An operation there
    without a guard raises: a new route cannot silently skip the check."""
    operations = []
    for route in _api_routes(app.router.routes):
        if not route.path.startswith("/api/v1/projects/{project_id}") or not route.include_in_schema:
            continue
        action = _guard_action(route.dependant)
        if action is None:
            raise AssertionError(f"{sorted(route.methods)} {route.path} has no require_project guard")
        for method in sorted(route.methods):
            operations.append(Operation(route.path, method, action, route.summary or ""))
    return sorted(operations)


def render_markdown(app: Any) -> str:
    lines = ["| action | least role | key scopes |", "|---|---|---|"]
    for action, role in MIN_ROLE.items():
        scopes = ", ".join(sorted(KEY_SCOPES[action])) or "none (users only)"
        lines.append(f"| `{action}` | {role} | {scopes} |")
    lines += ["", f"Roles rank {' > '.join(sorted(ROLE_RANK, key=ROLE_RANK.__getitem__, reverse=True))}. "
              "✓ = allowed, · = refused (403; 404 for a project the caller cannot see). Keys marked ✗ are "
              "refused by the handler itself (people management needs a person).", "",
              "| method | path | action | " + " | ".join(ROLES) + " | " + " | ".join(f"key:{s}" for s in SCOPES)
              + " |", "|---|---|---|" + "---|" * (len(ROLES) + len(SCOPES))]
    for op in project_operations(app):
        roles = " | ".join("✓" if op.role_may(r) else "·" for r in ROLES)
        keys = " | ".join("✓" if op.scope_may(s) else ("✗" if (op.method, op.path) in PEOPLE_ONLY
                                                         and scopes_allow(frozenset({s}), op.action) else "·")
                          for s in SCOPES)
        lines.append(f"| {op.method} | `{op.path.removeprefix('/api/v1/projects/{project_id}') or '/'}` | "
                     f"{op.action} | {roles} | {keys} |")
    return "\n".join(lines) + "\n"


def _app() -> Any:
    from api.main import create_app
    from api.settings import ApiSettings

    return create_app(ApiSettings())


BEGIN = "<!-- BEGIN GENERATED: python -m meterline.security_matrix -->"
END = "<!-- END GENERATED -->"


def write_doc(path: Path) -> None:
    """Replace the generated section of ``path`` (docs/security.md) with the current table."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{render_markdown(_app())}{END}{tail}")


def main() -> None:
    """``python -m meterline.security_matrix`` prints the table; ``--write`` updates docs/security.md."""
    if "--write" in sys.argv[1:]:
        write_doc(Path(__file__).resolve().parents[1] / "docs" / "security.md")
    else:
        print(render_markdown(_app()), end="")


if __name__ == "__main__":
    main()
