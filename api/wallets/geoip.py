"""Country of an IP address from a MaxMind database (``.mmdb``: GeoLite2/GeoIP2 Country or City), optional.

``API_GEOIP_DATABASE_PATH`` names the file; unset means "no lookup". The lookup never raises: a missing or
unreadable file, an address that is not in the database, a malformed address or a record without a country
all answer ``None`` (the caller falls back to the configured default), and the cause is logged — a broken GeoIP
database must never turn a user's sign-up into an error. The file is opened once per path and process and
shared by threads (the reader memory-maps it and is safe for concurrent reads).
"""

from __future__ import annotations

import ipaddress
import threading
from functools import lru_cache
from typing import Any

import structlog

log = structlog.get_logger("api.geoip")


class GeoIpLookup:
    """``country(ip)`` → ISO 3166-1 alpha-2 (upper case) or ``None``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: Any = None
        self._broken: str | None = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        if self._reader is not None or self._broken is not None:
            return self._reader
        with self._lock:
            if self._reader is None and self._broken is None:
                try:
                    import geoip2.database

                    self._reader = geoip2.database.Reader(self.path)
                except Exception as error:  # missing file, not an mmdb, no permission...
                    self._broken = f"{type(error).__name__}: {error}"
                    log.warning("geoip_database_unusable", path=self.path, error=self._broken)
        return self._reader

    @property
    def error(self) -> str | None:
        """Why the database cannot be used (None while it works or before the first lookup)."""
        return self._broken

    def country(self, ip: str) -> str | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        reader = self._open()
        if reader is None:
            return None
        try:
            record = reader.country(str(address)) if _is_country_db(reader) else reader.city(str(address))
        except Exception as error:  # AddressNotFoundError, corrupt data, a database of another type
            if type(error).__name__ != "AddressNotFoundError":
                log.warning("geoip_lookup_failed", path=self.path, error=f"{type(error).__name__}: {error}")
            return None
        code = getattr(getattr(record, "country", None), "iso_code", None)
        return code.upper() if isinstance(code, str) and len(code) == 2 and code.isalpha() else None


def _is_country_db(reader: Any) -> bool:
    return "City" not in str(reader.metadata().database_type)


@lru_cache(maxsize=4)
def lookup_for(path: str) -> GeoIpLookup:
    """One lookup (one open file) per path and process."""
    return GeoIpLookup(path)
