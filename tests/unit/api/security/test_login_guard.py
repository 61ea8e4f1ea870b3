"""Security item 3 (issue 14): login limits per network (IPv6 /64) and per account, lockout with backoff."""

from __future__ import annotations

import pytest

from api.middleware import RateLimited
from api.tenancy.login_guard import LoginGuard, network_key


def test_ipv6_clients_share_their_64_and_ipv4_mapped_counts_as_ipv4() -> None:
    assert network_key("2001:db8:1:2::1") == network_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert network_key("2001:db8:1:2::1") != network_key("2001:db8:1:3::1")
    assert network_key("::ffff:203.0.113.7") == network_key("203.0.113.7") == "ip:203.0.113.7"
    assert network_key("203.0.113.7") != network_key("203.0.113.8")


def test_lockout_after_failures_doubles_and_a_success_resets() -> None:
    guard = LoginGuard(rate_per_s=1000, burst=1000, lockout_after=3, base_s=1.0, max_s=8.0)
    t = 100.0
    for _ in range(3):
        guard.check("ada@example.com", now=t)
        guard.failed("ada@example.com", now=t)
    with pytest.raises(RateLimited):  # locked for 1 s
        guard.check("ada@example.com", now=t + 0.5)
    guard.check("grace@example.com", now=t + 0.5)  # another account is not affected
    guard.check("ada@example.com", now=t + 1.1)
    guard.failed("ada@example.com", now=t + 1.1)  # 4th failure: 2 s
    with pytest.raises(RateLimited) as locked:
        guard.check("ada@example.com", now=t + 2.9)
    assert locked.value.headers["Retry-After"] == "1"
    for _ in range(10):  # capped at max_s
        guard.failed("ada@example.com", now=t + 10)
    with pytest.raises(RateLimited) as capped:
        guard.check("ada@example.com", now=t + 17.9)
    assert capped.value.extra["retry_after_s"] <= 8.0
    guard.succeeded("ada@example.com")
    guard.check("ada@example.com", now=t + 18)


def test_per_account_bucket_limits_many_addresses_guessing_one_account() -> None:
    guard = LoginGuard(rate_per_s=0.01, burst=2, lockout_after=100, base_s=1.0, max_s=8.0)
    guard.check("ada@example.com", now=0.0)
    guard.check("ada@example.com", now=0.0)
    with pytest.raises(RateLimited):
        guard.check("ada@example.com", now=0.0)
