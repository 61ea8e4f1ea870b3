"""Who a request authenticated as: a user (JWT) or an API key.

Its own module so that both ``auth`` (which resolves callers) and ``keys`` (which checks API keys and builds
their principal) import it without importing each other in a loop: ``keys`` → ``principal`` ← ``auth`` → ``keys``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["user", "api_key"]
    user_id: str | None = None
    key_id: str | None = None
    project_id: str | None = None  # API keys only: the project the key belongs to
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def rate_key(self) -> str:
        return f"user:{self.user_id}" if self.kind == "user" else f"key:{self.key_id}"
