"""Erasure pseudonyms: the keyed hash that replaces an erased subject wherever its records are kept.

``pseudonym(key, project, value) = "psn_" + hex(HMAC-SHA256(key, project NUL value))``. Keyed with the
deployment's ``API_ERASURE_PSEUDONYM_KEY``: without the key nobody can test a guess ("was this alice?"), with it the
same (project, value) always gives the same pseudonym, so every store agrees and totals per pseudonym (usage in
ClickHouse, access decisions, audit entries) still add up across tables and across repeated erasures."""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "psn_"


def pseudonym(key: bytes, project_id: str, value: str) -> str:
    digest = hmac.new(key, f"{project_id}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return f"{PREFIX}{digest}"


def pseudonyms(key: bytes, project_id: str, values: set[str] | list[str]) -> dict[str, str]:
    """value → pseudonym, for every value (a pseudonym is never re-pseudonymised: it is already one)."""
    return {v: pseudonym(key, project_id, v) for v in sorted(set(values)) if not v.startswith(PREFIX)}
