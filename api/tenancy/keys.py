"""Per-project API keys: create, list, rotate, revoke, expire, authenticate.

A token looks like ``mlk_<prefix>_<secret>``: ``prefix`` is 8 lower-case hex characters kept in clear (for
lookup and for people to tell keys apart in a list), ``secret`` is 32 base62 characters (~190 bits from
``secrets``). Only ``sha256(token)`` is stored, and the token is shown once, at creation or rotation.

Why sha256 and not argon2 (which api uses for passwords): argon2 exists to make guessing LOW-entropy secrets
slow. A 190-bit random secret cannot be guessed whatever the hash, so a slow hash buys nothing against a
stolen table and would cost tens of milliseconds of CPU on every ingest request (the hot path authenticates
thousands of requests per second). The comparison is constant-time (``hmac.compare_digest``).

Invariants:
- a key authenticates for exactly one project (its row's project_id); every query here filters by it, so a
  key id of another project is "not found", never "forbidden" (existence is not leaked);
- revoked or expired keys never authenticate; revocation is final (a database trigger refuses undoing it);
- rotation creates a successor with the same name and scopes and ends the predecessor: at once (revoked)
  or after a grace period (its expires_at is moved to now + grace), so deployments can roll over.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from api.errors import ApiError, NotFound, Unauthorized
from api.tenancy.principal import Principal

TOKEN_PREFIX = "mlk_"
SCOPES = frozenset({"ingest", "read", "admin"})
_PREFIX_ALPHABET = "0123456789abcdef"
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 32
#: last_used_at is refreshed at most this often, so authentication is a read on the hot path.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class InvalidApiKey(Unauthorized):
    code = "api_key.invalid"


class RevokedApiKey(Unauthorized):
    code = "api_key.revoked"


class ExpiredApiKey(Unauthorized):
    code = "api_key.expired"


class InvalidScopes(ApiError):
    status = 422
    code = "api_key.invalid_scopes"


class ApiKeyNotFound(NotFound):
    code = "api_key.not_found"


@dataclass(frozen=True)
class ApiKey:
    """A stored key as listed (never the secret)."""

    id: str
    project_id: str
    name: str
    prefix: str
    scopes: frozenset[str]
    created_at: datetime
    created_by_user_id: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rotated_from: str | None

    def status(self, *, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, *, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "name": self.name,
            "prefix": self.prefix,
            "display": f"{TOKEN_PREFIX}{self.prefix}_…",
            "scopes": sorted(self.scopes),
            "status": self.status(now=now),
            "created_at": self.created_at.isoformat(),
            "created_by_user_id": self.created_by_user_id,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "rotated_from": self.rotated_from,
        }


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key together with its token: the only moment the token exists in clear."""

    key: ApiKey
    token: str


# --------------------------------------------------------------------------- pure helpers


def new_token() -> tuple[str, str]:
    """(prefix, token) with a fresh random secret."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
    return prefix, f"{TOKEN_PREFIX}{prefix}_{secret}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_prefix(token: str) -> str | None:
    """The prefix of a well-formed token, or None when the string is not shaped like a key."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    parts = token.split("_", 2)
    if len(parts) != 3 or len(parts[1]) != 8 or len(parts[2]) != _SECRET_LENGTH:
        return None
    prefix, secret = parts[1], parts[2]
    if any(c not in _PREFIX_ALPHABET for c in prefix) or any(c not in _SECRET_ALPHABET for c in secret):
        return None
    return prefix


def normalize_scopes(scopes: list[str] | tuple[str, ...] | frozenset[str] | set[str]) -> frozenset[str]:
    wanted = frozenset(scopes)
    unknown = wanted - SCOPES
    if not wanted or unknown:
        raise InvalidScopes(f"scopes must be a non-empty subset of {sorted(SCOPES)}; unknown: {sorted(unknown)}",
                            extra={"allowed": sorted(SCOPES)})
    return wanted


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- storage

_COLUMNS = ("id, project_id, name, prefix, scopes, created_at, created_by_user_id, expires_at, revoked_at, "
            "last_used_at, rotated_from")


def _row_to_key(row: Any) -> ApiKey:
    m = row._mapping
    return ApiKey(id=m["id"], project_id=m["project_id"], name=m["name"], prefix=m["prefix"],
                  scopes=frozenset(m["scopes"]), created_at=m["created_at"],
                  created_by_user_id=m["created_by_user_id"], expires_at=m["expires_at"],
                  revoked_at=m["revoked_at"], last_used_at=m["last_used_at"], rotated_from=m["rotated_from"])


def create_api_key(conn: Connection, *, project_id: str, name: str, scopes: list[str] | frozenset[str],
                   expires_at: datetime | None = None, created_by_user_id: str | None = None,
                   rotated_from: str | None = None) -> IssuedKey:
    """Insert a key and return it with its token (shown once). A prefix collision (2^-32 per pair) retries."""
    wanted = normalize_scopes(scopes)
    if expires_at is not None and expires_at.tzinfo is None:
        raise ApiError("expires_at must carry a time zone", status=422)
    for _ in range(5):
        prefix, token = new_token()
        row = conn.execute(text(
            f"""INSERT INTO api_keys (id, project_id, name, prefix, secret_hash, scopes, expires_at,
                                      created_by_user_id, rotated_from)
                VALUES (:id, :project_id, :name, :prefix, :secret_hash, :scopes, :expires_at,
                        :created_by_user_id, :rotated_from)
                ON CONFLICT (prefix) DO NOTHING
                RETURNING {_COLUMNS}"""),
            {"id": f"key_{secrets.token_hex(8)}", "project_id": project_id, "name": name, "prefix": prefix,
             "secret_hash": hash_token(token), "scopes": sorted(wanted), "expires_at": expires_at,
             "created_by_user_id": created_by_user_id, "rotated_from": rotated_from}).first()
        if row is not None:
            return IssuedKey(key=_row_to_key(row), token=token)
    raise RuntimeError("could not allocate a unique API key prefix in 5 attempts")  # pragma: no cover


def list_api_keys(conn: Connection, *, project_id: str) -> list[ApiKey]:
    rows = conn.execute(text(f"SELECT {_COLUMNS} FROM api_keys WHERE project_id = :p ORDER BY created_at, id"),
                        {"p": project_id}).all()
    return [_row_to_key(r) for r in rows]


def get_api_key(conn: Connection, *, project_id: str, key_id: str, for_update: bool = False) -> ApiKey:
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(text(f"SELECT {_COLUMNS} FROM api_keys WHERE project_id = :p AND id = :id{lock}"),
                       {"p": project_id, "id": key_id}).first()
    if row is None:
        raise ApiKeyNotFound(f"no API key {key_id} in this project")
    return _row_to_key(row)


def revoke_api_key(conn: Connection, *, project_id: str, key_id: str) -> ApiKey:
    """Revoke at once. Revoking a revoked key is a no-op that returns it unchanged (idempotent)."""
    key = get_api_key(conn, project_id=project_id, key_id=key_id, for_update=True)
    if key.revoked_at is not None:
        return key
    row = conn.execute(text(f"UPDATE api_keys SET revoked_at = now() WHERE id = :id RETURNING {_COLUMNS}"),
                       {"id": key_id}).one()
    return _row_to_key(row)


def rotate_api_key(conn: Connection, *, project_id: str, key_id: str, grace: timedelta = timedelta(0),
                   created_by_user_id: str | None = None) -> tuple[ApiKey, IssuedKey]:
    """Issue a successor (same name, scopes and expiry) and end the predecessor now or after ``grace``.

    Returns (the predecessor as updated, the successor with its token). Rotating a revoked or expired key
    is refused: it would resurrect access that was deliberately ended."""
    old = get_api_key(conn, project_id=project_id, key_id=key_id, for_update=True)
    now = _now()
    if old.status(now=now) != "active":
        raise ApiError(f"API key {key_id} is {old.status(now=now)}; create a new key instead", status=409,
                       extra={"key_status": old.status(now=now)})
    if grace < timedelta(0):
        raise ApiError("grace must not be negative", status=422)
    issued = create_api_key(conn, project_id=project_id, name=old.name, scopes=old.scopes,
                            expires_at=old.expires_at, created_by_user_id=created_by_user_id, rotated_from=old.id)
    if grace == timedelta(0):
        row = conn.execute(text(f"UPDATE api_keys SET revoked_at = now() WHERE id = :id RETURNING {_COLUMNS}"),
                           {"id": key_id}).one()
    else:
        ends = now + grace
        if old.expires_at is not None:
            ends = min(ends, old.expires_at)
        row = conn.execute(text(f"UPDATE api_keys SET expires_at = :e WHERE id = :id RETURNING {_COLUMNS}"),
                           {"id": key_id, "e": ends}).one()
    return _row_to_key(row), issued


# --------------------------------------------------------------------------- authentication


def authenticate_api_key(conn: Connection, token: str) -> Principal | None:
    """The Principal of a valid key; None if ``token`` is not an API key at all (so other schemes may try).

    Raises ``Unauthorized`` subclasses for a key-shaped token that is unknown, wrong, revoked or expired."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    prefix = token_prefix(token)
    if prefix is None:
        raise InvalidApiKey("malformed API key")
    row = conn.execute(text(
        "SELECT id, project_id, secret_hash, scopes, expires_at, revoked_at, last_used_at "
        "FROM api_keys WHERE prefix = :prefix"), {"prefix": prefix}).first()
    # compare even when the prefix is unknown so timing does not tell which prefixes exist
    stored_hash = row.secret_hash if row is not None else "0" * 64
    if not hmac.compare_digest(stored_hash, hash_token(token)) or row is None:
        raise InvalidApiKey("unknown API key")
    now = _now()
    if row.revoked_at is not None:
        raise RevokedApiKey("this API key has been revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise ExpiredApiKey("this API key has expired")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        conn.execute(text("UPDATE api_keys SET last_used_at = :now WHERE id = :id AND revoked_at IS NULL"),
                     {"now": now, "id": row.id})
    return Principal(kind="api_key", user_id=None, key_id=row.id, project_id=row.project_id,
                     scopes=frozenset(row.scopes))


# --------------------------------------------------------------------------- authentication cache


class KeyCache:
    """Recently authenticated keys, per app, for the ingest hot path (no database round trip per request).

    Trade-off, stated: a key revoked or rotated through ANOTHER API process keeps working here for at most
    ``ttl_s`` seconds; in this process the key routes invalidate it at once. Expiry is re-checked on every
    hit. Entries are keyed by sha256(token), never the token; the size is bounded (oldest dropped)."""

    def __init__(self, *, ttl_s: float, entries_max: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.entries_max = entries_max
        self._entries: dict[str, tuple[Principal, datetime | None, float]] = {}

    def get(self, token: str, *, now_monotonic: float) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(hash_token(token))
        if entry is None:
            return None
        principal, expires_at, cached_at = entry
        if now_monotonic - cached_at > self.ttl_s or (expires_at is not None and expires_at <= _now()):
            self._entries.pop(hash_token(token), None)
            return None
        return principal

    def put(self, token: str, principal: Principal, *, expires_at: datetime | None, now_monotonic: float) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.entries_max:
            self._entries.pop(next(iter(self._entries)))
        self._entries[hash_token(token)] = (principal, expires_at, now_monotonic)

    def invalidate(self, key_id: str) -> None:
        for digest in [d for d, (p, _, _) in self._entries.items() if p.key_id == key_id]:
            self._entries.pop(digest, None)


def key_expiry(conn: Connection, key_id: str) -> datetime | None:
    return conn.execute(text("SELECT expires_at FROM api_keys WHERE id = :id"), {"id": key_id}).scalar()
