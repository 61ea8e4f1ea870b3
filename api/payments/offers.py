"""The offer catalog: what a project sells. A *pack* is a one-off amount of credits for a price; a *plan* grants
its credits once per billing interval while its subscription is paid.

Offers are immutable once created (payments and entitlements point at them); changing a price means a new
offer and archiving the old one. Archived offers cannot be bought but keep mapping webhooks of existing
subscriptions. Provider product ids (Stripe price, RevenueCat product, Lemon Squeezy variant) are how a
webhook that did not come from a Meterline checkout finds its offer.

A plan says what happens to a period's credits when the period ends (``credits_expire``): ``period_end`` — the
bucket a paid period grants expires at that period's end plus ``credits_grace_s`` and the ledger's expiry job
posts what is left as ``expiry`` (breakage); ``never`` — they roll over. Packs never expire with a period."""

from __future__ import annotations

import calendar
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import errors as pg_errors
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from api.errors import Conflict, NotFound

COLUMNS = ("id, project_id, slug, kind, name, credits_minor, price_minor, currency, billing_interval, interval_count, "
           "stripe_price_id, revenuecat_product_id, lemonsqueezy_variant_id, credits_expire, credits_grace_s, created_at, "
           "archived_at")
CREDITS_EXPIRE = ("period_end", "never")
PRODUCT_COLUMNS = {"stripe": "stripe_price_id", "revenuecat": "revenuecat_product_id",
                   "lemonsqueezy": "lemonsqueezy_variant_id"}


class OfferConflict(Conflict):
    code = "api.offer_conflict"


@dataclass(frozen=True, slots=True)
class Offer:
    id: str
    project_id: str
    slug: str
    kind: str
    name: str
    credits_minor: int
    price_minor: int
    currency: str
    billing_interval: str | None
    interval_count: int
    stripe_price_id: str | None
    revenuecat_product_id: str | None
    lemonsqueezy_variant_id: str | None
    credits_expire: str
    credits_grace_s: int
    created_at: datetime
    archived_at: datetime | None

    @property
    def expires_with_period(self) -> bool:
        return self.kind == "plan" and self.credits_expire == "period_end"

    def period_end_after(self, start: datetime) -> datetime:
        """The end of one billing period of this plan starting at ``start`` (calendar months and years: the same
        day, clamped to the month's last day)."""
        count = self.interval_count
        if self.billing_interval == "day":
            return start + timedelta(days=count)
        if self.billing_interval == "week":
            return start + timedelta(weeks=count)
        months = count * (12 if self.billing_interval == "year" else 1)
        index = start.month - 1 + months
        year, month = start.year + index // 12, index % 12 + 1
        return start.replace(year=year, month=month, day=min(start.day, calendar.monthrange(year, month)[1]))

    @classmethod
    def of(cls, row: Any) -> Offer:
        return cls(**{name: row[name] for name in cls.__slots__})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_offer(conn: Connection, *, project_id: str, kind: str, slug: str, name: str, credits_minor: int,
                 price_minor: int, currency: str, billing_interval: str | None, interval_count: int,
                 stripe_price_id: str | None, revenuecat_product_id: str | None,
                 lemonsqueezy_variant_id: str | None, credits_expire: str = "never",
                 credits_grace_s: int = 0) -> Offer:
    if kind != "plan" and (credits_expire != "never" or credits_grace_s):
        raise ValueError("a pack's credits never expire with a period")
    params = {"id": f"off_{uuid.uuid4().hex[:20]}", "project_id": project_id, "slug": slug, "kind": kind,
              "name": name, "credits_minor": credits_minor, "price_minor": price_minor, "currency": currency.lower(),
              "billing_interval": billing_interval, "interval_count": interval_count,
              "stripe_price_id": stripe_price_id, "revenuecat_product_id": revenuecat_product_id,
              "lemonsqueezy_variant_id": lemonsqueezy_variant_id, "credits_expire": credits_expire,
              "credits_grace_s": credits_grace_s}
    try:
        with conn.begin_nested():
            row = conn.execute(text(f"""
                INSERT INTO payment_offers (id, project_id, slug, kind, name, credits_minor, price_minor, currency,
                    billing_interval, interval_count, stripe_price_id, revenuecat_product_id, lemonsqueezy_variant_id,
                    credits_expire, credits_grace_s)
                VALUES (:id, :project_id, :slug, :kind, :name, :credits_minor, :price_minor, :currency,
                    :billing_interval, :interval_count, :stripe_price_id, :revenuecat_product_id,
                    :lemonsqueezy_variant_id, :credits_expire, :credits_grace_s)
                RETURNING {COLUMNS}"""), params).mappings().one()
    except IntegrityError as exc:
        if isinstance(exc.orig, pg_errors.UniqueViolation):
            raise OfferConflict("an offer with this slug (archived ones included) or provider product id already "
                                "exists in the project", extra={"slug": slug}) from exc
        raise
    return Offer.of(row)


def list_offers(conn: Connection, *, project_id: str, kind: str | None = None,
                include_archived: bool = False) -> list[Offer]:
    rows = conn.execute(text(f"""
        SELECT {COLUMNS} FROM payment_offers
        WHERE project_id = :p AND (CAST(:k AS text) IS NULL OR kind = :k) AND (:all OR archived_at IS NULL)
        ORDER BY created_at, id"""), {"p": project_id, "k": kind, "all": include_archived}).mappings().all()
    return [Offer.of(r) for r in rows]


def get_offer(conn: Connection, *, project_id: str, slug: str | None = None, offer_id: str | None = None,
              kind: str | None = None) -> Offer | None:
    row = conn.execute(text(f"""
        SELECT {COLUMNS} FROM payment_offers
        WHERE project_id = :p AND (slug = :s OR id = :i) AND (CAST(:k AS text) IS NULL OR kind = :k)"""),
                       {"p": project_id, "s": slug, "i": offer_id, "k": kind}).mappings().first()
    return Offer.of(row) if row else None


def require_offer(conn: Connection, *, project_id: str, slug: str, kind: str | None = None) -> Offer:
    offer = get_offer(conn, project_id=project_id, slug=slug, kind=kind)
    if offer is None:
        raise NotFound(f"no {kind or 'offer'} {slug!r} in this project", extra={"offer": slug})
    return offer


def offer_for_product(conn: Connection, *, project_id: str, provider: str, product_id: str) -> Offer | None:
    """The offer a provider's product id maps to (live offers first, then the newest archived one)."""
    column = PRODUCT_COLUMNS[provider]
    row = conn.execute(text(f"""
        SELECT {COLUMNS} FROM payment_offers WHERE project_id = :p AND {column} = :x
        ORDER BY archived_at IS NOT NULL, archived_at DESC LIMIT 1"""),
                       {"p": project_id, "x": product_id}).mappings().first()
    return Offer.of(row) if row else None


def pack_by_price(conn: Connection, *, project_id: str, price_minor: int, currency: str) -> Offer | None:
    """The ONE live pack with this price, or None when none or several match."""
    rows = conn.execute(text(f"""
        SELECT {COLUMNS} FROM payment_offers
        WHERE project_id = :p AND kind = 'pack' AND archived_at IS NULL AND price_minor = :a AND currency = :c
        LIMIT 2"""), {"p": project_id, "a": price_minor, "c": currency.lower()}).mappings().all()
    return Offer.of(rows[0]) if len(rows) == 1 else None


def archive_offer(conn: Connection, *, project_id: str, slug: str, kind: str) -> tuple[Offer, Offer]:
    before = require_offer(conn, project_id=project_id, slug=slug, kind=kind)
    row = conn.execute(text(f"""
        UPDATE payment_offers SET archived_at = coalesce(archived_at, now()) WHERE id = :id RETURNING {COLUMNS}"""),
                       {"id": before.id}).mappings().one()
    return before, Offer.of(row)
