"""The sign-up bonus: credits an end user's wallet gets when the operator's backend creates it at sign-up.

A project's ``BonusConfig`` says how much (a default, per-country amounts, 0 = none for that country), how long
the credits last (an optional expiry of the bonus bucket) and the abuse limits (one bonus per device per project,
at most N per IP network per rolling day). ``decide`` is the pure decision; ``grant_signup_bonus`` runs it in
the wallet creation's transaction, records the decision and posts the grant through ``ledger.service``.

Where the facts come from. The request reaches Meterline from the OPERATOR'S BACKEND, not from the end user's
device, so the HTTP peer address and any CDN country header describe that backend, never the user: the user's
IP, device id and (if the operator knows it) country travel in the body (``signup``). The country is, in
order: the explicit ``country``; the GeoIP database (``API_GEOIP_DATABASE_PATH``) looked up with the body's IP;
else unknown, which gets the default amount.

Invariants:
- at most one bonus per (project, wallet): the decision row's primary key and the ledger key
  ``signup_bonus:{project}:{wallet}`` — a retried creation answers the recorded decision and never grants twice;
- at most one granted bonus per (project, device): checked under a transaction advisory lock on the device's
  hash, backed by a partial UNIQUE index; only a keyed hash (HMAC-SHA256, per-project) of the device id is
  stored, never the id;
- at most ``ip_network_daily_limit`` granted bonuses per (project, /24 IPv4 or /64 IPv6 network) in any 24 h,
  checked under an advisory lock on the network (concurrent sign-ups from one network cannot both pass);
- a refused bonus is not an error: the wallet is created and the answer carries ``granted_minor = 0`` and the
  reason; a refused decision is recorded too, so a retry answers the same.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, text

from ledger import service
from ledger.contracts import TransactionKind

COUNTRY = re.compile(r"^[A-Z]{2}$")

Reason = Literal["granted", "not_configured", "disabled", "country_zero", "no_amount", "device_seen",
                 "device_id_required", "ip_network_limit", "existing_wallet"]
CountrySource = Literal["explicit", "geoip", "none"]

#: What each refusal means (documented in the API and README).
REASONS: dict[str, str] = {
    "granted": "the bonus was granted",
    "not_configured": "the project has no sign-up bonus configured",
    "disabled": "the project's sign-up bonus is switched off",
    "country_zero": "the user's country has a bonus of 0",
    "no_amount": "no amount applies (default 0 and no amount for the user's country)",
    "device_seen": "this device already received the project's sign-up bonus",
    "device_id_required": "the config requires a device id and none was sent",
    "ip_network_limit": "the IP network reached its sign-ups-with-bonus limit for the last 24 h",
    "existing_wallet": "the wallet existed before this request without a bonus decision (not a sign-up)",
}


@dataclass(frozen=True, slots=True)
class BonusConfig:
    enabled: bool = True
    default_amount_minor: int = 0
    country_amounts: dict[str, int] = field(default_factory=dict)
    expires_after_s: int | None = None
    ip_network_daily_limit: int | None = None  # None = no limit
    require_device_id: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "default_amount_minor": self.default_amount_minor,
                "country_amounts": dict(sorted(self.country_amounts.items())),
                "expires_after_s": self.expires_after_s, "ip_network_daily_limit": self.ip_network_daily_limit,
                "require_device_id": self.require_device_id}


@dataclass(frozen=True, slots=True)
class SignupFacts:
    """What the operator's backend tells about the end user (all optional)."""

    country: str | None = None
    ip: str | None = None
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    granted_minor: int
    reason: Reason
    country: str | None
    country_source: CountrySource
    expires_at: datetime | None = None


# --------------------------------------------------------------------------------------------- pure parts


def normalize_country(value: str | None) -> str | None:
    """ISO 3166-1 alpha-2, upper case; anything else is None."""
    if value is None:
        return None
    code = value.strip().upper()
    return code if COUNTRY.match(code) else None


def resolve_country(facts: SignupFacts, geoip: Any | None) -> tuple[str | None, CountrySource]:
    """Explicit country first, then GeoIP of the body's IP (``geoip.country(ip)``), else unknown."""
    explicit = normalize_country(facts.country)
    if explicit is not None:
        return explicit, "explicit"
    if geoip is not None and facts.ip:
        found = normalize_country(geoip.country(facts.ip))
        if found is not None:
            return found, "geoip"
    return None, "none"


def ip_network(ip: str | None) -> str | None:
    """The network the IP limit counts: /24 for IPv4 (IPv4-mapped IPv6 counts as IPv4), /64 for IPv6."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def device_hash(secret: bytes, project_id: str, device_id: str) -> str:
    """Keyed, per-project hash of a device id: stable for dedupe, useless for recovering the id or linking a
    device across projects without the key."""
    message = f"{project_id}\x00{device_id.strip()}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def amount_for(config: BonusConfig, country: str | None) -> tuple[int, Reason | None]:
    """The amount for a country; a refusal reason when it is 0."""
    if country is not None and country in config.country_amounts:
        amount = config.country_amounts[country]
        return (amount, None) if amount > 0 else (0, "country_zero")
    if config.default_amount_minor > 0:
        return config.default_amount_minor, None
    return 0, "no_amount"


def decide(config: BonusConfig | None, *, country: str | None, country_source: CountrySource,
           device_seen: bool, device_given: bool, ip_network_grants_last_day: int, now: datetime) -> Decision:
    """The whole decision, given what the database said (device seen, grants in the IP network in 24 h).

    Order: configured/enabled → amount (a country at 0 is refused before the abuse checks, so a refusal there
    costs nothing) → device → IP network."""

    def refuse(reason: Reason) -> Decision:
        return Decision(0, reason, country, country_source)

    if config is None:
        return refuse("not_configured")
    if not config.enabled:
        return refuse("disabled")
    amount, refusal = amount_for(config, country)
    if refusal is not None:
        return refuse(refusal)
    if config.require_device_id and not device_given:
        return refuse("device_id_required")
    if device_seen:
        return refuse("device_seen")
    if config.ip_network_daily_limit is not None and ip_network_grants_last_day >= config.ip_network_daily_limit:
        return refuse("ip_network_limit")
    expires_at = now + timedelta(seconds=config.expires_after_s) if config.expires_after_s else None
    return Decision(amount, "granted", country, country_source, expires_at)


# --------------------------------------------------------------------------------------------- database


def _config_of(row: Any) -> BonusConfig:
    return BonusConfig(enabled=row["enabled"], default_amount_minor=int(row["default_amount_minor"]),
                       country_amounts={k: int(v) for k, v in (row["country_amounts"] or {}).items()},
                       expires_after_s=row["expires_after_s"], ip_network_daily_limit=row["ip_network_daily_limit"],
                       require_device_id=row["require_device_id"])


def get_config(conn: Connection, project_id: str) -> BonusConfig | None:
    row = conn.execute(text("SELECT * FROM signup_bonus_configs WHERE project_id = :p"),
                       {"p": project_id}).mappings().one_or_none()
    return None if row is None else _config_of(row)


def put_config(conn: Connection, project_id: str, config: BonusConfig) -> tuple[BonusConfig | None, BonusConfig]:
    """Replace the project's config; (before, after)."""
    before = conn.execute(text("SELECT * FROM signup_bonus_configs WHERE project_id = :p FOR UPDATE"),
                          {"p": project_id}).mappings().one_or_none()
    row = conn.execute(text("""
        INSERT INTO signup_bonus_configs (project_id, enabled, default_amount_minor, country_amounts,
                                          expires_after_s, ip_network_daily_limit, require_device_id)
        VALUES (:p, :enabled, :default, CAST(:countries AS jsonb), :expires, :limit, :require_device)
        ON CONFLICT (project_id) DO UPDATE SET
            enabled = EXCLUDED.enabled, default_amount_minor = EXCLUDED.default_amount_minor,
            country_amounts = EXCLUDED.country_amounts, expires_after_s = EXCLUDED.expires_after_s,
            ip_network_daily_limit = EXCLUDED.ip_network_daily_limit,
            require_device_id = EXCLUDED.require_device_id, updated_at = now()
        RETURNING *"""), {
        "p": project_id, "enabled": config.enabled, "default": config.default_amount_minor,
        "countries": orjson.dumps(config.country_amounts).decode(), "expires": config.expires_after_s,
        "limit": config.ip_network_daily_limit, "require_device": config.require_device_id}).mappings().one()
    return (None if before is None else _config_of(before)), _config_of(row)


def _lock(conn: Connection, scope: str) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": scope})


def recorded(conn: Connection, project_id: str, wallet_id: str) -> Decision | None:
    row = conn.execute(text("""
        SELECT granted_minor, reason, country, country_source, expires_at FROM signup_bonus_grants
        WHERE project_id = :p AND wallet_id = :w"""), {"p": project_id, "w": wallet_id}).one_or_none()
    if row is None:
        return None
    return Decision(int(row.granted_minor), row.reason, row.country, row.country_source, row.expires_at)


def grant_signup_bonus(conn: Connection, *, project_id: str, wallet_id: str, facts: SignupFacts,
                       device_secret: bytes, geoip: Any | None) -> tuple[Decision, int | None]:
    """Decide, record and (when granted) post the bonus, in the caller's transaction. Returns the decision
    and the ledger transaction id. A decision already recorded for the wallet is returned unchanged."""
    _lock(conn, f"signup_bonus:wallet:{project_id}:{wallet_id}")
    earlier = recorded(conn, project_id, wallet_id)
    if earlier is not None:
        return earlier, transaction_id_of(conn, project_id, wallet_id)
    config = get_config(conn, project_id)
    if config is None:  # nothing recorded: the project does not run a bonus
        return Decision(0, "not_configured", normalize_country(facts.country),
                        "explicit" if normalize_country(facts.country) else "none"), None
    country, source = resolve_country(facts, geoip)
    device = device_hash(device_secret, project_id, facts.device_id) if facts.device_id else None
    network = ip_network(facts.ip)
    device_seen, network_grants = False, 0
    if config.enabled:
        # lock order: device, then network (every sign-up takes them in this order → no deadlock)
        if device is not None:
            _lock(conn, f"signup_bonus:device:{project_id}:{device}")
            device_seen = conn.execute(text("""
                SELECT 1 FROM signup_bonus_grants WHERE project_id = :p AND device_hash = :d AND granted_minor > 0
            """), {"p": project_id, "d": device}).first() is not None
        if network is not None and config.ip_network_daily_limit is not None:
            _lock(conn, f"signup_bonus:network:{project_id}:{network}")
            network_grants = int(conn.execute(text("""
                SELECT count(*) FROM signup_bonus_grants
                WHERE project_id = :p AND ip_network = :n AND granted_minor > 0
                  AND created_at > now() - interval '24 hours'
            """), {"p": project_id, "n": network}).scalar_one())
    now = conn.execute(text("SELECT now()")).scalar_one()
    decision = decide(config, country=country, country_source=source, device_seen=device_seen,
                      device_given=device is not None, ip_network_grants_last_day=network_grants, now=now)
    transaction_id: int | None = None
    if decision.granted_minor > 0:
        result = service.grant_credits(
            conn, wallet_id=wallet_id, amount_minor=decision.granted_minor, kind=TransactionKind.BONUS,
            idempotency_key=ledger_key(project_id, wallet_id), expires_at=decision.expires_at,
            source_ref="signup_bonus", reason="sign-up bonus",
            metadata={"country": country, "country_source": source})
        transaction_id = result.transaction.id
    conn.execute(text("""
        INSERT INTO signup_bonus_grants (project_id, wallet_id, granted_minor, reason, country, country_source,
                                         device_hash, ip_network, expires_at, transaction_id, created_at)
        VALUES (:p, :w, :amount, :reason, :country, :source, :device, :network, :expires, :tx, :now)"""), {
        "p": project_id, "w": wallet_id, "amount": decision.granted_minor, "reason": decision.reason,
        "country": country, "source": source, "device": device, "network": network,
        "expires": decision.expires_at, "tx": transaction_id, "now": now})
    return decision, transaction_id


def ledger_key(project_id: str, wallet_id: str) -> str:
    return f"signup_bonus:{project_id}:{wallet_id}"


def transaction_id_of(conn: Connection, project_id: str, wallet_id: str) -> int | None:
    value = conn.execute(text("SELECT transaction_id FROM signup_bonus_grants WHERE project_id = :p AND wallet_id = :w"),
                         {"p": project_id, "w": wallet_id}).scalar()
    return None if value is None else int(value)


def device_secret(settings: Any) -> bytes:
    """``API_DEVICE_HASH_SECRET``, or a key derived from ``API_JWT_SECRET`` when it is empty."""
    own = settings.device_hash_secret.get_secret_value()
    if own:
        return bytes(own.encode())
    return hmac.new(settings.jwt_secret.get_secret_value().encode(), b"meterline signup device hash",
                    hashlib.sha256).digest()
