"""Security item 7 (issue 14): revoking or rotating a key must not let a racing request cache it again.

The key routes invalidate the cache before their transaction commits; a request in between reads the still
unrevoked row and, on main, cached the key again for the TTL (5 s of a revoked key working)."""

from __future__ import annotations

import time

from api.tenancy.keys import KeyCache
from api.tenancy.principal import Principal

TOKEN = "mlk_0123abcd_" + "A" * 32
KEY = Principal(kind="api_key", key_id="key_1", project_id="prj_1", scopes=frozenset({"admin"}))


def test_an_invalidated_key_is_not_cached_again_within_the_ttl() -> None:
    cache = KeyCache(ttl_s=5.0)
    t0 = time.monotonic()
    cache.put(TOKEN, KEY, expires_at=None, now_monotonic=t0)
    assert cache.get(TOKEN, now_monotonic=t0 + 0.1) == KEY
    cache.invalidate("key_1")  # the revoke route, before its commit
    cache.put(TOKEN, KEY, expires_at=None, now_monotonic=t0 + 0.3)  # a racing request read the uncommitted row
    assert cache.get(TOKEN, now_monotonic=t0 + 0.4) is None  # so every request goes to the database
    cache.put(TOKEN, KEY, expires_at=None, now_monotonic=t0 + 6.0)  # long after the commit: caching resumes
    assert cache.get(TOKEN, now_monotonic=t0 + 6.1) == KEY
