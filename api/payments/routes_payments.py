"""Selling credits over HTTP, under /api/v1/projects/{id}: the offer catalog (credit packs and plans; admins
create and archive, everyone in the project reads), provider settings (admin; secrets write-only), Stripe
Checkout sessions (members), payments and entitlements (read), received webhooks (admin: list, replay a
deferred or unmatched one). Every change is audited. Webhook receivers are in api/payments/routes_webhooks.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import text

from api.deps import ConnectionDep, SettingsDep
from api.errors import ApiError, NotFound
from api.pagination import LIMIT_DEFAULT, LIMIT_MAX
from api.payments import checkout, config, dunning, manual, offers, webhooks
from api.payments.effects import Entitlement
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.validation import RequestModel, StrictInt
from api.wallets.idempotency import require_key
from api.wallets.routes_wallets import wallet_in_project

router = APIRouter(prefix="/api/v1/projects/{project_id}", tags=["payments"])
Read = Annotated[ProjectAccess, require_project("read")]
Write = Annotated[ProjectAccess, require_project("write")]
Admin = Annotated[ProjectAccess, require_project("admin")]
SLUG = Path(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", examples=["starter"])
Provider = Literal["stripe", "revenuecat", "lemonsqueezy"]


# ------------------------------------------------------------------------------------------------ offers


class _OfferIn(RequestModel):
    model_config = ConfigDict(extra="forbid")
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    name: str = Field(min_length=1, max_length=200)
    credits_minor: StrictInt = Field(gt=0, le=10**15, description="credits (minor units) granted per purchase / period")
    price_minor: StrictInt = Field(ge=0, le=10**12, description="price in the currency's minor units (cents)")
    currency: str = Field(pattern=r"^[A-Za-z]{3}$", examples=["usd"])
    stripe_price_id: str | None = Field(default=None, max_length=200,
                                        description="checkout uses this Stripe Price; webhooks map it back")
    revenuecat_product_id: str | None = Field(default=None, max_length=200)
    lemonsqueezy_variant_id: str | None = Field(default=None, max_length=200)


class PackIn(_OfferIn):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "slug": "starter", "name": "Starter pack", "credits_minor": 1000, "price_minor": 1000, "currency": "usd"}]})
    credits_expire: None = Field(default=None, description="plans only: a pack's credits never expire with a "
                                                           "period (leave it out)")
    credits_grace_s: None = Field(default=None, description="plans only (leave it out)")

    @model_validator(mode="before")
    @classmethod
    def _plans_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("credits_expire") is not None
                                       or data.get("credits_grace_s") is not None):
            raise ValueError("credits_expire and credits_grace_s are for plans: a pack's credits never expire with "
                             "a billing period. Leave them out here, or sell credits that end with their cycle as "
                             "a plan (POST /plans)")
        return data


GRACE_MAX_S = 365 * 86400


class PlanIn(_OfferIn):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"slug": "pro_monthly", "name": "Pro", "credits_minor": 5000, "price_minor": 5000, "currency": "usd",
         "interval": "month"},
        {"slug": "team_yearly", "name": "Team (credits roll over)", "credits_minor": 100000, "price_minor": 50000,
         "currency": "usd", "interval": "year", "credits_expire": "never"},
        {"slug": "pro_monthly_grace", "name": "Pro, 3 days to use up a month", "credits_minor": 5000,
         "price_minor": 5000, "currency": "usd", "interval": "month", "credits_expire": "period_end",
         "credits_grace_s": 259200}]})
    interval: Literal["day", "week", "month", "year"] = "month"
    interval_count: int = Field(default=1, ge=1, le=365)
    credits_expire: Literal["period_end", "never"] = Field(default="period_end", description=(
        "period_end (default): the credits of a paid period expire when the period ends (+ credits_grace_s) and "
        "what is left is posted as expiry; never: they roll over into the next periods"))
    credits_grace_s: int = Field(default=0, ge=0, le=GRACE_MAX_S, description=(
        "seconds after the period's end before its credits expire (0-31536000); only with period_end"))

    @model_validator(mode="after")
    def _grace_needs_expiry(self) -> PlanIn:
        if self.credits_grace_s and self.credits_expire == "never":
            raise ValueError("credits_grace_s only applies when credits expire: set credits_expire to "
                             "'period_end', or drop credits_grace_s for credits that roll over")
        return self


class OfferOut(BaseModel):
    id: str
    slug: str
    kind: Literal["pack", "plan"]
    name: str
    credits_minor: int
    price_minor: int
    currency: str
    interval: str | None
    interval_count: int | None
    stripe_price_id: str | None
    revenuecat_product_id: str | None
    lemonsqueezy_variant_id: str | None
    credits_expire: Literal["period_end", "never"] = Field(description=(
        "period_end: a paid period's credits expire at the period's end + credits_grace_s; never: they roll over "
        "(always never for a pack)"))
    credits_grace_s: int
    created_at: datetime
    archived_at: datetime | None

    @classmethod
    def of(cls, o: offers.Offer) -> OfferOut:
        return cls(id=o.id, slug=o.slug, kind=o.kind, name=o.name, credits_minor=o.credits_minor,  # type: ignore[arg-type]
                   price_minor=o.price_minor, currency=o.currency, interval=o.billing_interval,
                   interval_count=o.interval_count if o.kind == "plan" else None, stripe_price_id=o.stripe_price_id,
                   revenuecat_product_id=o.revenuecat_product_id, lemonsqueezy_variant_id=o.lemonsqueezy_variant_id,
                   credits_expire=o.credits_expire, credits_grace_s=o.credits_grace_s,  # type: ignore[arg-type]
                   created_at=o.created_at, archived_at=o.archived_at)


def _create(access: ProjectAccess, conn: Any, body: _OfferIn, kind: str) -> OfferOut:
    offer = offers.create_offer(
        conn, project_id=access.project_id, kind=kind, slug=body.slug, name=body.name,
        credits_minor=body.credits_minor, price_minor=body.price_minor, currency=body.currency,
        billing_interval=getattr(body, "interval", None), interval_count=getattr(body, "interval_count", 1),
        stripe_price_id=body.stripe_price_id, revenuecat_product_id=body.revenuecat_product_id,
        lemonsqueezy_variant_id=body.lemonsqueezy_variant_id,
        credits_expire=getattr(body, "credits_expire", None) or "never",
        credits_grace_s=getattr(body, "credits_grace_s", None) or 0)
    audit(conn, access, action=f"{kind}.create", target_kind=kind, target_id=offer.id, after=offer.as_dict())
    return OfferOut.of(offer)


def _archive(access: ProjectAccess, conn: Any, slug: str, kind: str) -> OfferOut:
    before, after = offers.archive_offer(conn, project_id=access.project_id, slug=slug, kind=kind)
    if before.archived_at is None:
        audit(conn, access, action=f"{kind}.archive", target_kind=kind, target_id=after.id,
              before={"archived_at": None}, after={"archived_at": after.archived_at})
    return OfferOut.of(after)


@router.post("/credit-packs", status_code=201, response_model=OfferOut, summary="Sell a credit pack (admin)",
             responses={409: {"description": "slug or provider product id already used"}})
def create_pack(body: PackIn, access: Admin, conn: ConnectionDep) -> OfferOut:
    return _create(access, conn, body, "pack")


@router.get("/credit-packs", response_model=list[OfferOut], summary="The project's credit packs")
def list_packs(access: Read, conn: ConnectionDep, include_archived: bool = False) -> list[OfferOut]:
    return [OfferOut.of(o) for o in offers.list_offers(conn, project_id=access.project_id, kind="pack",
                                                       include_archived=include_archived)]


@router.get("/credit-packs/{slug}", response_model=OfferOut, summary="One credit pack (archived ones too)",
            responses={404: {"description": "no such pack in this project"}})
def show_pack(slug: Annotated[str, SLUG], access: Read, conn: ConnectionDep) -> OfferOut:
    return OfferOut.of(offers.require_offer(conn, project_id=access.project_id, slug=slug, kind="pack"))


@router.post("/credit-packs/{slug}/archive", response_model=OfferOut, summary="Stop selling a pack (admin)")
def archive_pack(slug: Annotated[str, SLUG], access: Admin, conn: ConnectionDep) -> OfferOut:
    return _archive(access, conn, slug, "pack")


@router.post("/plans", status_code=201, response_model=OfferOut,
             summary="Sell a plan: credits per period, by default expiring at the period's end (admin)",
             responses={409: {"description": "slug or provider product id already used"}})
def create_plan(body: PlanIn, access: Admin, conn: ConnectionDep) -> OfferOut:
    return _create(access, conn, body, "plan")


@router.get("/plans", response_model=list[OfferOut], summary="The project's subscription plans")
def list_plans(access: Read, conn: ConnectionDep, include_archived: bool = False) -> list[OfferOut]:
    return [OfferOut.of(o) for o in offers.list_offers(conn, project_id=access.project_id, kind="plan",
                                                       include_archived=include_archived)]


@router.get("/plans/{slug}", response_model=OfferOut, summary="One plan (archived ones too)",
            responses={404: {"description": "no such plan in this project"}})
def show_plan(slug: Annotated[str, SLUG], access: Read, conn: ConnectionDep) -> OfferOut:
    return OfferOut.of(offers.require_offer(conn, project_id=access.project_id, slug=slug, kind="plan"))


@router.post("/plans/{slug}/archive", response_model=OfferOut,
             summary="Stop selling a plan (admin); existing subscriptions keep renewing")
def archive_plan(slug: Annotated[str, SLUG], access: Admin, conn: ConnectionDep) -> OfferOut:
    return _archive(access, conn, slug, "plan")


# -------------------------------------------------------------------------------------- provider settings


class ProviderIn(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"webhook_secret": "whsec_..."}, {"webhook_secret": "ls_signing_secret", "accept_sandbox": True},
        {"accept_sandbox": False}]})
    webhook_secret: str | None = Field(default=None, min_length=6, max_length=500, description=(
        "stripe: the endpoint's signing secret (whsec_...); lemonsqueezy: the webhook signing secret; "
        "revenuecat: the exact Authorization header value configured in RevenueCat (e.g. 'Bearer ...'). "
        "Required the first time; left out, the stored secret (and api_key) are kept"))
    api_key: str | None = Field(default=None, min_length=6, max_length=500, description=(
        "stripe: the project's own secret key for checkout; revenuecat: a secret API key (sk_...) and "
        "lemonsqueezy: an API key, which the receipts reconciliation reads the provider's API with"))
    store_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[0-9]+$", description=(
        "lemonsqueezy only: the store whose orders and subscriptions the reconciliation lists. Left out, the "
        "stored value is kept"))
    accept_sandbox: bool | None = Field(default=None, description=(
        "revenuecat and lemonsqueezy: grant credits for sandbox / test-mode purchases (RevenueCat environment "
        "SANDBOX, Lemon Squeezy test_mode). Off by default: such events are stored and answered 'ignored'. "
        "Left out, the stored value is kept. Not for stripe (test and live mode have their own secrets)"))


class ProviderOut(BaseModel):
    provider: str
    webhook_secret_set: bool
    webhook_secret_last4: str | None
    api_key_set: bool
    store_id: str | None = None
    accept_sandbox: bool | None = Field(description=(
        "whether sandbox / test-mode purchases grant credits (revenuecat, lemonsqueezy); null for stripe"))
    webhook_url: str


@router.put("/payment-providers/{provider}", response_model=ProviderOut,
            summary="Set a provider's webhook secret and sandbox acceptance for this project (admin; secrets never "
                    "returned)")
def put_provider(provider: Provider, body: ProviderIn, access: Admin, conn: ConnectionDep,
                 settings: SettingsDep) -> ProviderOut:
    if body.store_id is not None and provider != "lemonsqueezy":
        raise ApiError("store_id is for lemonsqueezy only", status=422)
    if body.accept_sandbox is not None and provider == "stripe":
        raise ApiError("accept_sandbox is for revenuecat and lemonsqueezy: Stripe keeps test mode apart by its own "
                       "keys; a test-mode event only verifies with the test endpoint's secret, so use a separate "
                       "project (or endpoint secret) for test mode", status=422)
    if body.webhook_secret is None:
        if config.get_config(conn, project_id=access.project_id, provider=provider) is None:
            raise ApiError(f"webhook_secret is required: {provider} has no settings in this project yet",
                           status=422)
        if body.api_key is not None:
            raise ApiError("send webhook_secret with api_key (both are replaced together)", status=422)
    before, after = config.put_config(conn, project_id=access.project_id, provider=provider,
                                      webhook_secret=body.webhook_secret, api_key=body.api_key,
                                      accept_sandbox=body.accept_sandbox, store_id=body.store_id)
    audit(conn, access, action="payment_provider.put", target_kind="payment_provider", target_id=provider,
          before=before.public() if before else None, after=after.public())
    return _provider_out(settings.public_base_url, access.project_id, provider, after)


@router.get("/payment-providers/{provider}", response_model=ProviderOut, summary="A provider's settings (admin)")
def get_provider(provider: Provider, access: Admin, conn: ConnectionDep, settings: SettingsDep) -> ProviderOut:
    return _provider_out(settings.public_base_url, access.project_id, provider,
                         config.get_config(conn, project_id=access.project_id, provider=provider))


def _provider_out(base: str, project_id: str, provider: str, cfg: config.ProviderConfig | None) -> ProviderOut:
    return ProviderOut(provider=provider, webhook_secret_set=cfg is not None,
                       webhook_secret_last4=cfg.webhook_secret[-4:] if cfg else None,
                       api_key_set=bool(cfg and cfg.api_key), store_id=cfg.store_id if cfg else None,
                       accept_sandbox=None if provider == "stripe" else bool(cfg and cfg.accept_sandbox),
                       webhook_url=f"{base.rstrip('/')}/api/v1/webhooks/{provider}/{project_id}")


# ------------------------------------------------------------------------------------------------ checkout


class CheckoutIn(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "wallet_id": "w_...", "offer": "starter", "success_url": "https://example.com/ok",
        "cancel_url": "https://example.com/cancel"}]})
    wallet_id: str = Field(min_length=1, max_length=200)
    offer: str = Field(min_length=1, max_length=64, description="slug of a credit pack or plan")
    success_url: str = Field(min_length=1, max_length=2000)
    cancel_url: str = Field(min_length=1, max_length=2000)
    customer_email: str | None = Field(default=None, max_length=320)

    @model_validator(mode="after")
    def _urls(self) -> CheckoutIn:
        for url in (self.success_url, self.cancel_url):
            if not url.startswith(("https://", "http://")):
                raise ValueError("success_url and cancel_url must be http(s) URLs")
        return self


class CheckoutOut(BaseModel):
    id: str
    url: str | None
    mode: str
    wallet_id: str
    offer: str


@router.post("/checkout/sessions", status_code=201, response_model=CheckoutOut,
             summary="A Stripe Checkout Session buying a pack or plan for a wallet (member; Idempotency-Key)",
             responses={404: {"description": "unknown wallet or offer"}, 409: {"description": "archived offer"},
                        502: {"description": "Stripe failed"}})
def create_checkout(body: CheckoutIn, access: Write, conn: ConnectionDep, settings: SettingsDep,
                    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> CheckoutOut:
    client_key = require_key(idempotency_key)
    wallet = wallet_in_project(conn, project_id=access.project_id, wallet_id=body.wallet_id)
    offer = offers.require_offer(conn, project_id=access.project_id, slug=body.offer)
    if offer.archived_at is not None:
        raise offers.OfferConflict(f"{offer.kind} {offer.slug!r} is archived and no longer sold")
    params = checkout.session_params(project_id=access.project_id, wallet_id=wallet.id, offer=offer,
                                     success_url=body.success_url, cancel_url=body.cancel_url,
                                     customer_email=body.customer_email)
    # only plain reads so far: no row lock is held while Stripe answers
    session = checkout.create_session(api_key=config.stripe_api_key(conn, settings, project_id=access.project_id),
                                      api_base=settings.stripe_api_base, project_id=access.project_id,
                                      client_key=client_key, params=params)
    checkout.store_session(conn, project_id=access.project_id, wallet_id=wallet.id, offer=offer, session=session,
                           user_id=access.principal.user_id)
    audit(conn, access, action="checkout.create", target_kind="checkout_session", target_id=session.id,
          after={"wallet_id": wallet.id, "offer": offer.slug, "mode": session.mode})
    return CheckoutOut(id=session.id, url=session.url, mode=session.mode, wallet_id=wallet.id, offer=offer.slug)


# ------------------------------------------------------------------------------- entitlements and payments


class EntitlementOut(BaseModel):
    id: str
    wallet_id: str
    plan: str
    provider: str
    external_subscription_id: str
    external_customer_id: str | None
    status: str
    active: bool = Field(description="grants access now: a live status and the paid period not over")
    will_renew: bool
    current_period_start: datetime | None
    current_period_end: datetime | None
    ended_at: datetime | None
    updated_at: datetime


def _entitlements(conn: Any, project_id: str, wallet_id: str | None, active_only: bool) -> list[EntitlementOut]:
    rows = conn.execute(text("""
        SELECT e.*, o.slug AS plan FROM entitlements e JOIN payment_offers o ON o.id = e.offer_id
        WHERE e.project_id = :p AND (CAST(:w AS text) IS NULL OR e.wallet_id = :w)
        ORDER BY e.created_at, e.id"""), {"p": project_id, "w": wallet_id}).mappings().all()
    now = datetime.now(UTC)
    out = []
    for row in rows:
        ent = Entitlement.of(row)
        active = ent.active_at(now)
        if active_only and not active:
            continue
        out.append(EntitlementOut(id=ent.id, wallet_id=ent.wallet_id, plan=row["plan"], provider=ent.provider,
                                  external_subscription_id=ent.external_subscription_id,
                                  external_customer_id=ent.external_customer_id, status=ent.status, active=active,
                                  will_renew=ent.will_renew, current_period_start=ent.current_period_start,
                                  current_period_end=ent.current_period_end, ended_at=ent.ended_at,
                                  updated_at=ent.updated_at))
    return out


@router.get("/entitlements", response_model=list[EntitlementOut], summary="Subscriptions and what they entitle")
def list_entitlements(access: Read, conn: ConnectionDep,
                      wallet_id: Annotated[str | None, Query(max_length=200)] = None,
                      active: Annotated[bool, Query(description="only those granting access now")] = False,
                      ) -> list[EntitlementOut]:
    return _entitlements(conn, access.project_id, wallet_id, active)


@router.get("/wallets/{wallet_id}/entitlements", response_model=list[EntitlementOut],
            summary="A wallet's entitlements")
def wallet_entitlements(wallet_id: str, access: Read, conn: ConnectionDep,
                        active: bool = False) -> list[EntitlementOut]:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    return _entitlements(conn, access.project_id, wallet_id, active)


class ManualEntitlementIn(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"plan": "pro_monthly", "reason": "sales contract ACME-2026-014", "reference": "ACME-2026-014",
         "period_end": "2027-01-01T00:00:00Z", "grant_credits": True}]})
    plan: str = Field(min_length=1, max_length=100, description="a plan's slug (POST /plans)")
    reason: str = Field(min_length=1, max_length=500, description="why (kept in the audit log)")
    reference: str | None = Field(default=None, max_length=200, description="your reference (a contract number); "
                                  "the same reference grants once. Default: a new one")
    period_end: AwareDatetime | None = Field(default=None, description="when it stops granting access; default "
                                                                       "never (until ended)")
    grant_credits: bool = Field(default=False, description="also grant the plan's credits once, as a "
                                                           "subscription grant expiring like the plan's credits")


class ManualEntitlementOut(EntitlementOut):
    credits_transaction_id: int | None = None


def _entitlement_out(conn: Any, project_id: str, entitlement_id: str) -> EntitlementOut:
    (out,) = [e for e in _entitlements(conn, project_id, None, False) if e.id == entitlement_id]
    return out


@router.post("/wallets/{wallet_id}/entitlements", status_code=201, response_model=ManualEntitlementOut,
             responses={200: {"model": ManualEntitlementOut, "description": "this reference was granted before"}},
             summary="Grant a plan to a wallet without a payment provider (admin, audited): local testing, "
                     "sales-led customers")
def grant_entitlement(wallet_id: str, body: ManualEntitlementIn, access: Admin, conn: ConnectionDep,
                      response: Response) -> ManualEntitlementOut:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    entitlement, created, transaction_id = manual.grant(
        conn, project_id=access.project_id, wallet_id=wallet_id, plan=body.plan, reference=body.reference,
        period_end=body.period_end, grant_credits=body.grant_credits, reason=body.reason)
    out = _entitlement_out(conn, access.project_id, entitlement.id)
    if created:
        audit(conn, access, action="entitlement.grant", target_kind="entitlement", target_id=entitlement.id,
              after={"wallet_id": wallet_id, "plan": body.plan, "reference": entitlement.external_subscription_id,
                     "period_end": body.period_end.isoformat() if body.period_end else None,
                     "credits_transaction_id": transaction_id, "reason": body.reason})
    else:
        response.status_code = 200
    return ManualEntitlementOut(**out.model_dump(), credits_transaction_id=transaction_id)


class EndEntitlementIn(RequestModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500)


@router.post("/wallets/{wallet_id}/entitlements/{entitlement_id}/end", response_model=EntitlementOut,
             summary="End an entitlement granted by an admin (admin, audited); credits already granted stay")
def end_entitlement(wallet_id: str, entitlement_id: str, body: EndEntitlementIn, access: Admin,
                    conn: ConnectionDep) -> EntitlementOut:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    before, after = manual.end(conn, project_id=access.project_id, wallet_id=wallet_id,
                               entitlement_id=entitlement_id)
    audit(conn, access, action="entitlement.end", target_kind="entitlement", target_id=entitlement_id,
          before={k: v.isoformat() if isinstance(v, datetime) else v for k, v in before.items()},
          after={"status": after.status, "reason": body.reason})
    return _entitlement_out(conn, access.project_id, entitlement_id)


class PaymentOut(BaseModel):
    id: str
    provider: str
    external_id: str
    payment_ref: str | None
    wallet_id: str
    offer: str
    entitlement_id: str | None
    amount_minor: int
    currency: str
    credits_minor: int
    grant_transaction_id: int | None = Field(description="the ledger grant; null for a $0 payment (nothing granted)")
    credits_expire_at: datetime | None = Field(description="when the credits this payment granted expire (null: "
                                                           "they roll over)")
    refunded_minor: int
    disputed_minor: int
    clawed_back_minor: int
    status: str
    created_at: datetime
    updated_at: datetime


@router.get("/payments", response_model=list[PaymentOut], summary="Payments received (newest first)")
def list_payments(access: Read, conn: ConnectionDep, wallet_id: Annotated[str | None, Query(max_length=200)] = None,
                  limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT) -> list[PaymentOut]:
    rows = conn.execute(text("""
        SELECT p.*, o.slug AS offer FROM payments p JOIN payment_offers o ON o.id = p.offer_id
        WHERE p.project_id = :p AND (CAST(:w AS text) IS NULL OR p.wallet_id = :w)
        ORDER BY p.created_at DESC, p.id DESC LIMIT :limit"""),
                        {"p": access.project_id, "w": wallet_id, "limit": limit}).mappings().all()
    return [PaymentOut(**{k: r[k] for k in PaymentOut.model_fields}) for r in rows]


class EntitlementEventOut(BaseModel):
    id: int
    entitlement_id: str
    wallet_id: str
    provider: str
    external_subscription_id: str
    from_status: str | None
    to_status: str
    reason: str
    at: datetime
    created_at: datetime


@router.get("/entitlement-events", response_model=list[EntitlementEventOut],
            summary="Every entitlement status change (webhooks, dunning), newest first")
def list_entitlement_events(access: Read, conn: ConnectionDep,
                            wallet_id: Annotated[str | None, Query(max_length=200)] = None,
                            limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT,
                            ) -> list[EntitlementEventOut]:
    return [EntitlementEventOut(**r) for r in dunning.list_events(conn, project_id=access.project_id,
                                                                   wallet_id=wallet_id, limit=limit)]


# ------------------------------------------------------------------------------------------ webhook events


class WebhookEventOut(BaseModel):
    id: int
    provider: str
    event_id: str | None
    event_type: str | None
    status: str
    error: str | None
    defer_ref: str | None
    transaction_ids: list[int]
    body_sha256: str
    received_at: datetime
    processed_at: datetime | None


@router.get("/webhook-events", response_model=list[WebhookEventOut],
            summary="Received webhooks, newest first (admin)")
def list_webhook_events(access: Admin, conn: ConnectionDep, provider: Provider | None = None,
                        status: Annotated[str | None, Query(max_length=20)] = None,
                        before_id: int | None = None,
                        limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT) -> list[WebhookEventOut]:
    rows = conn.execute(text("""
        SELECT id, provider, event_id, event_type, status, error, defer_ref, transaction_ids, body_sha256,
               received_at, processed_at
        FROM webhook_events
        WHERE project_id = :p AND (CAST(:v AS text) IS NULL OR provider = :v)
          AND (CAST(:s AS text) IS NULL OR status = :s) AND (CAST(:b AS bigint) IS NULL OR id < :b)
        ORDER BY id DESC LIMIT :limit"""),
                        {"p": access.project_id, "v": provider, "s": status, "b": before_id,
                         "limit": limit}).mappings().all()
    return [WebhookEventOut(**r) for r in rows]


@router.get("/webhook-events/{event_row_id}/body", summary="The raw body of a received webhook (admin)")
def webhook_event_body(event_row_id: int, access: Admin, conn: ConnectionDep) -> Response:
    body = conn.execute(text("SELECT body FROM webhook_events WHERE id = :id AND project_id = :p"),
                        {"id": event_row_id, "p": access.project_id}).scalar()
    if body is None:
        raise NotFound("webhook event not found")
    return Response(bytes(body), media_type="application/octet-stream")


@router.post("/webhook-events/{event_row_id}/replay",
             summary="Re-run a deferred, unmatched or held webhook, or an ignored sandbox one (admin)")
def replay_webhook_event(event_row_id: int, access: Admin, conn: ConnectionDep) -> dict[str, Any]:
    outcome = webhooks.replay(conn, project_id=access.project_id, webhook_event_id=event_row_id)
    if outcome is None:
        raise NotFound("no deferred, unmatched, held or ignored sandbox webhook event with this id")
    audit(conn, access, action="webhook_event.replay", target_kind="webhook_event", target_id=str(event_row_id),
          after={"status": outcome.status, "transaction_ids": list(outcome.transaction_ids)})
    return outcome.body()


class DismissIn(RequestModel):
    reason: str = Field(min_length=1, max_length=500, description="why, e.g. 'refunded in the Stripe dashboard'")


@router.post("/webhook-events/{event_row_id}/dismiss",
             summary="Close a held webhook (a purchase for a closed wallet) without applying it (admin)")
def dismiss_webhook_event(event_row_id: int, body: DismissIn, access: Admin, conn: ConnectionDep) -> dict[str, Any]:
    outcome = webhooks.dismiss(conn, project_id=access.project_id, webhook_event_id=event_row_id,
                               reason=body.reason)
    if outcome is None:
        raise NotFound("no held webhook event with this id")
    audit(conn, access, action="webhook_event.dismiss", target_kind="webhook_event", target_id=str(event_row_id),
          after={"status": outcome.status, "reason": body.reason})
    return outcome.body()
