"""The sign-up bonus decision without a database: country resolution, amounts, abuse limits, networks, device
hashes, and the GeoIP wrapper on a tiny .mmdb built here (and its failure modes: never raises)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from api.wallets.geoip import GeoIpLookup
from api.wallets.signup_bonus import (
    REASONS,
    BonusConfig,
    SignupFacts,
    amount_for,
    decide,
    device_hash,
    ip_network,
    normalize_country,
    resolve_country,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
CONFIG = BonusConfig(default_amount_minor=100, country_amounts={"US": 500, "GB": 400, "IN": 0},
                     expires_after_s=30 * 24 * 3600, ip_network_daily_limit=2)


class FakeGeo:
    """A stand-in for GeoIpLookup (the real one is tested below on a real .mmdb)."""

    def __init__(self, table: dict[str, str | None]) -> None:
        self.table = table
        self.calls: list[str] = []

    def country(self, ip: str) -> str | None:
        self.calls.append(ip)
        return self.table.get(ip)


def _decide(config: BonusConfig | None = CONFIG, country: str | None = None, *, device_seen: bool = False,
            device_given: bool = True, network: int = 0) -> tuple[int, str]:
    d = decide(config, country=country, country_source="explicit" if country else "none", device_seen=device_seen,
               device_given=device_given, ip_network_grants_last_day=network, now=NOW)
    return d.granted_minor, d.reason


def test_country_resolution_order() -> None:
    geo = FakeGeo({"203.0.113.7": "GB", "198.51.100.1": None})
    assert resolve_country(SignupFacts(country="us", ip="203.0.113.7"), geo) == ("US", "explicit")
    assert geo.calls == []  # an explicit country needs no lookup
    assert resolve_country(SignupFacts(ip="203.0.113.7"), geo) == ("GB", "geoip")
    assert resolve_country(SignupFacts(ip="198.51.100.1"), geo) == (None, "none")  # not in the database
    assert resolve_country(SignupFacts(ip="203.0.113.7"), None) == (None, "none")  # no database configured
    assert resolve_country(SignupFacts(country="USA", ip="203.0.113.7"), geo) == ("GB", "geoip")  # junk ignored
    assert resolve_country(SignupFacts(), geo) == (None, "none")
    assert normalize_country(" gb ") == "GB" and normalize_country("G1") is None and normalize_country(None) is None


def test_amounts_by_country_default_and_zero() -> None:
    assert amount_for(CONFIG, "US") == (500, None)
    assert amount_for(CONFIG, "GB") == (400, None)
    assert amount_for(CONFIG, "DE") == (100, None)  # not listed → default
    assert amount_for(CONFIG, None) == (100, None)  # unknown → default
    assert amount_for(CONFIG, "IN") == (0, "country_zero")
    assert amount_for(BonusConfig(country_amounts={"US": 5}), "DE") == (0, "no_amount")


def test_decision_reasons_in_order() -> None:
    assert _decide(None, "US") == (0, "not_configured")
    assert _decide(BonusConfig(enabled=False, default_amount_minor=5), "US") == (0, "disabled")
    assert _decide(country="US") == (500, "granted")
    assert _decide(country="IN", device_seen=True, network=99) == (0, "country_zero")  # before the abuse checks
    assert _decide(country="US", device_seen=True) == (0, "device_seen")
    assert _decide(country="US", network=1) == (500, "granted")
    assert _decide(country="US", network=2) == (0, "ip_network_limit")
    assert _decide(BonusConfig(default_amount_minor=5), network=10**6) == (5, "granted")  # no limit configured
    assert _decide(BonusConfig(default_amount_minor=5, ip_network_daily_limit=0)) == (0, "ip_network_limit")
    strict = BonusConfig(default_amount_minor=5, require_device_id=True)
    assert _decide(strict, device_given=False) == (0, "device_id_required")
    assert _decide(strict, device_given=True) == (5, "granted")
    for _, reason in (_decide(None), _decide(country="IN"), _decide(strict, device_given=False)):
        assert reason in REASONS


def test_granted_bonus_carries_the_expiry() -> None:
    d = decide(CONFIG, country="US", country_source="explicit", device_seen=False, device_given=True,
               ip_network_grants_last_day=0, now=NOW)
    assert d.expires_at == NOW + timedelta(days=30)
    never = decide(BonusConfig(default_amount_minor=1), country=None, country_source="none", device_seen=False,
                   device_given=False, ip_network_grants_last_day=0, now=NOW)
    assert never.expires_at is None
    refused = decide(CONFIG, country="IN", country_source="explicit", device_seen=False, device_given=True,
                     ip_network_grants_last_day=0, now=NOW)
    assert refused.expires_at is None


@pytest.mark.parametrize(("ip", "network"), [
    ("203.0.113.7", "203.0.113.0/24"),
    ("203.0.113.250", "203.0.113.0/24"),
    ("::ffff:203.0.113.9", "203.0.113.0/24"),  # IPv4-mapped counts as the IPv4 network
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
    ("not an ip", None),
    ("", None),
    (None, None),
])
def test_ip_networks(ip: str | None, network: str | None) -> None:
    assert ip_network(ip) == network


def test_device_hash_is_keyed_and_per_project() -> None:
    a = device_hash(b"k1", "prj_a", "device-1")
    assert a == device_hash(b"k1", "prj_a", " device-1 ")
    assert "device-1" not in a and len(a) == 64
    assert a != device_hash(b"k2", "prj_a", "device-1")  # another key
    assert a != device_hash(b"k1", "prj_b", "device-1")  # another project cannot link the device
    assert a != device_hash(b"k1", "prj_a", "device-2")


def _mmdb(path: Path) -> Path:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", languages=["en"], ipv4_compatible=True)
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    writer.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["192.0.2.0/24"]), {"continent": {"code": "EU"}})  # a record without a country
    writer.to_db_file(str(path))
    return path


def test_geoip_lookup_on_a_real_mmdb(tmp_path: Path) -> None:
    geo = GeoIpLookup(str(_mmdb(tmp_path / "country.mmdb")))
    assert geo.country("81.2.69.160") == "GB"
    assert geo.country("2001:db8::1") == "DE"
    assert geo.country("8.8.8.8") is None  # not in the database
    assert geo.country("192.0.2.1") is None  # no country in the record
    assert geo.country("not-an-ip") is None
    assert geo.error is None
    assert resolve_country(SignupFacts(ip="81.2.69.160"), geo) == ("GB", "geoip")


def test_geoip_lookup_failure_modes_answer_none(tmp_path: Path) -> None:
    missing = GeoIpLookup(str(tmp_path / "nope.mmdb"))
    assert missing.country("81.2.69.160") is None
    assert missing.error is not None and "nope.mmdb" in missing.error
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"this is not a maxmind database" * 10)
    broken = GeoIpLookup(str(garbage))
    assert broken.country("81.2.69.160") is None and broken.error is not None
    # the sign-up still resolves: explicit wins, otherwise unknown → default amount
    assert resolve_country(SignupFacts(ip="81.2.69.160"), broken) == (None, "none")
    assert resolve_country(SignupFacts(country="FR", ip="81.2.69.160"), broken) == ("FR", "explicit")
