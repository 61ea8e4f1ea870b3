"""The per-app API-key authentication cache and the token format (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.tenancy.keys import KeyCache, hash_token, new_token, token_prefix
from api.tenancy.principal import Principal


def _principal(key_id: str) -> Principal:
    return Principal(kind="api_key", key_id=key_id, project_id="prj_1", scopes=frozenset({"ingest"}))


def test_cache_hits_within_ttl_and_forgets_after_it_expiry_or_invalidation() -> None:
    cache = KeyCache(ttl_s=5.0)
    _, token = new_token()
    cache.put(token, _principal("k1"), expires_at=None, now_monotonic=100.0)
    assert cache.get(token, now_monotonic=104.9) == _principal("k1")
    assert cache.get(token, now_monotonic=105.1) is None  # past the TTL: back to the database
    cache.put(token, _principal("k1"), expires_at=datetime.now(UTC) - timedelta(seconds=1), now_monotonic=100.0)
    assert cache.get(token, now_monotonic=100.1) is None  # the key's own expiry is checked on every hit
    cache.put(token, _principal("k1"), expires_at=None, now_monotonic=100.0)
    cache.invalidate("k1")
    assert cache.get(token, now_monotonic=100.1) is None
    assert KeyCache(ttl_s=0).get(token, now_monotonic=0.0) is None


def test_cache_is_bounded_and_keyed_by_hash() -> None:
    cache = KeyCache(ttl_s=60.0, entries_max=3)
    tokens = [new_token()[1] for _ in range(5)]
    for i, token in enumerate(tokens):
        cache.put(token, _principal(f"k{i}"), expires_at=None, now_monotonic=0.0)
    assert [cache.get(t, now_monotonic=1.0) is not None for t in tokens] == [False, False, True, True, True]
    assert all(t not in str(cache._entries) for t in tokens)  # only sha256 digests are kept
    assert hash_token(tokens[0]) != tokens[0]


def test_token_shape() -> None:
    prefix, token = new_token()
    assert token_prefix(token) == prefix and len(prefix) == 8
    assert token_prefix("mlk_ABCDEFGH_" + "a" * 32) is None  # prefix is lower-case hex
    assert token_prefix(token + "x") is None and token_prefix("Bearer") is None
