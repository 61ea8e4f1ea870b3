"""What a verified provider event may do, as small steps shared by the three providers. Every step runs in
the webhook's transaction (the event row, the ledger postings, payments and entitlements commit together).

Exactly once:
- a purchase or subscription payment grants credits with the ledger idempotency key
  ``pay:{project}:{provider}:{external payment id}`` (checkout session, invoice, store transaction, order) and
  is recorded once in ``payments``; a second event for the same payment (redelivery, invoice.paid next to
  invoice.payment_succeeded) finds the payment and posts nothing;
- refunds and chargebacks are *cumulative*: the payment keeps the money refunded/disputed so far, the credits
  to claw back are ``ceil(credits × reversed money / paid money)`` (all of them for a full reversal), and only
  the difference to what was already clawed back is posted (a negative ``adjustment`` that burns what is left
  of the payment's own bucket first, then the other buckets in burn order, and may create debt; a won dispute
  or a reversed refund posts it back). Replays and reordered partial refunds converge. What of the payment's
  bucket already expired is not clawed back again (at most credits − expired);
- a plan with ``credits_expire = period_end`` grants each paid period as its own bucket expiring at the
  period's end (from the provider event) + the plan's grace; the ledger's expiry job posts what is left then as
  ``expiry``. The expiry comes from the event alone, so reordered events give the same buckets;
- entitlements move by provider time (``state_at``): an older event never overwrites a newer state, ``ended``
  is final, and the paid period only ever grows.

Out of order: an event about something not seen yet (an invoice of a subscription whose checkout has not
arrived, a refund before its purchase) raises ``Defer(ref)``; the event is stored as ``deferred`` and re-run
when an event creates that thing (``ctx.wakes``). The result is the state in-order delivery gives."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from api.payments.dunning import record_change
from api.payments.offers import Offer, get_offer
from ledger import queries, service
from ledger.contracts import TransactionKind
from streams import catalog

ACCESS_STATUSES = ("trialing", "active", "past_due", "cancelled")


class Defer(Exception):
    """The event needs something that has not arrived yet (``ref``); keep it and re-run it later."""

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(reason)
        self.ref = ref
        self.reason = reason


class Unmatched(Exception):
    """The event is valid but maps to nothing configured (no offer, no wallet); an admin may replay it."""


class Held(Exception):
    """A purchase for a wallet closed by an account erasure request. Decided: it is HELD, not refunded by us —
    RevenueCat's app-store purchases cannot be refunded through an API at all, and a refund is the operator's
    call. The event is stored ``held`` (200, so the provider stops retrying) with what to do: cancel the erasure
    and replay it, or refund it in the provider's dashboard and dismiss it. Nothing it did is kept."""


@dataclass
class Ctx:
    conn: Connection
    project_id: str
    provider: str
    event_id: str
    event_type: str
    at: datetime  # the provider's time of the event
    transaction_ids: list[int] = field(default_factory=list)
    wakes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored: bool = False

    def ignore(self, reason: str) -> None:
        """The event changes nothing (it is stored as ``ignored`` with the reason)."""
        self.notes.append(reason)
        self.ignored = True


@dataclass(frozen=True, slots=True)
class Entitlement:
    id: str
    project_id: str
    wallet_id: str
    offer_id: str
    provider: str
    external_subscription_id: str
    external_customer_id: str | None
    status: str
    will_renew: bool
    current_period_start: datetime | None
    current_period_end: datetime | None
    ended_at: datetime | None
    state_at: datetime
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> Entitlement:
        return cls(**{name: row[name] for name in cls.__slots__})

    def active_at(self, moment: datetime) -> bool:
        return self.status in ACCESS_STATUSES and (self.current_period_end is None or self.current_period_end > moment)


# ---------------------------------------------------------------------------------------------- wallets


def resolve_wallet(ctx: Ctx, ref: object) -> str:
    """A wallet of this project named by a provider-side reference: a wallet id, else a subject key (the
    customer's id in the product; its subject wallet is created if needed, as usage would)."""
    if ref is None or str(ref).strip() == "":
        raise Unmatched("the event names no customer (wallet id or subject)")
    ref = str(ref)
    wallet = queries.get_wallet(ctx.conn, ref)
    if wallet is not None:
        if wallet.project_id != ctx.project_id:
            raise Unmatched("the wallet named by the event belongs to another project")
        return wallet.id
    mapped = ctx.conn.execute(text("SELECT wallet_id FROM subject_keys WHERE project_id = :p AND subject = :s"),
                              {"p": ctx.project_id, "s": ref}).scalar()
    wallet_id = str(mapped) if mapped else catalog.set_subject_key(ctx.conn, project_id=ctx.project_id,
                                                                    subject=ref).wallet_id
    existing = queries.get_wallet(ctx.conn, wallet_id)
    if existing is not None:
        # a subject key written before set_subject_key checked the project may name another tenant's wallet
        if existing.project_id != ctx.project_id:
            raise Unmatched("the customer's subject key names a wallet of another project")
        return existing.id
    return service.ensure_wallet(ctx.conn, project_id=ctx.project_id, owner_kind="subject", owner_ref=ref,
                                 wallet_id=wallet_id).id


def offer_by_id(ctx: Ctx, offer_id: str) -> Offer:
    offer = get_offer(ctx.conn, project_id=ctx.project_id, offer_id=offer_id)
    assert offer is not None
    return offer


def refuse_closed_wallet(ctx: Ctx, wallet_id: str) -> None:
    """A purchase must not land in a wallet whose account erasure was requested: hold the event (see ``Held``).
    Refunds, disputes and subscription state changes are not purchases and still apply to a closed wallet."""
    wallet = queries.get_wallet(ctx.conn, wallet_id)
    if wallet is not None and wallet.closed_at is not None:
        raise Held(f"wallet {wallet_id} is closed (account erasure requested at {wallet.closed_at.isoformat()}): "
                   f"the purchase is held. Cancel the erasure and replay this event "
                   f"(POST /api/v1/projects/{ctx.project_id}/webhook-events/{{id}}/replay), or refund it in "
                   f"{ctx.provider}'s dashboard and dismiss it (POST …/webhook-events/{{id}}/dismiss)")


# --------------------------------------------------------------------------------------------- payments


def _payment(ctx: Ctx, refs: list[str]) -> Any:
    """The payment a provider handle names: its own id, its first payment handle, or any handle linked later
    (``payment_refs``: every payment of a multi-payment Stripe invoice)."""
    return ctx.conn.execute(text("""
        SELECT * FROM payments WHERE project_id = :p AND provider = :v
          AND (external_id = ANY(:refs) OR payment_ref = ANY(:refs)
               OR id IN (SELECT payment_id FROM payment_refs
                         WHERE project_id = :p AND provider = :v AND ref = ANY(:refs)))
        ORDER BY created_at LIMIT 1 FOR UPDATE"""),
                            {"p": ctx.project_id, "v": ctx.provider, "refs": refs}).mappings().first()


def payment_recorded(ctx: Ctx, external_id: str) -> bool:
    return _payment(ctx, [external_id]) is not None


def _add_ref(ctx: Ctx, payment_id: str, ref: str) -> bool:
    """Link a handle to a payment; False when it was linked already."""
    return ctx.conn.execute(text("""
        INSERT INTO payment_refs (payment_id, project_id, provider, ref) VALUES (:id, :p, :v, :r)
        ON CONFLICT (payment_id, ref) DO NOTHING RETURNING ref"""),
                            {"id": payment_id, "p": ctx.project_id, "v": ctx.provider, "r": ref}).first() is not None


def record_unpaid(ctx: Ctx, *, external_id: str, wallet_id: str, offer: Offer, currency: str,
                  entitlement_id: str | None = None, payment_refs: tuple[str, ...] = ()) -> None:
    """A $0 payment (a trial invoice): recorded with no credits and no grant, so an ``invoice_payment.paid`` or
    a refund naming it resolves as "nothing to claw back" instead of waiting for a payment forever."""
    if _payment(ctx, [external_id]) is not None:
        ctx.ignore(f"payment {external_id} was already recorded")
        return
    payment_id = f"pay_{uuid.uuid4().hex[:20]}"
    ctx.conn.execute(text("""
        INSERT INTO payments (id, project_id, provider, external_id, payment_ref, wallet_id, offer_id, entitlement_id,
                              amount_minor, currency, credits_minor, grant_transaction_id)
        VALUES (:id, :p, :v, :x, :r, :w, :o, :e, 0, :c, 0, NULL)"""),
                     {"id": payment_id, "p": ctx.project_id, "v": ctx.provider, "x": external_id,
                      "r": payment_refs[0] if payment_refs else None, "w": wallet_id, "o": offer.id,
                      "e": entitlement_id, "c": currency.lower()})
    for ref in payment_refs:
        _add_ref(ctx, payment_id, ref)
    ctx.notes.append(f"a $0 payment {external_id}: recorded, no credits (a refund of it claws back nothing)")
    ctx.wakes.extend(f"pay:{r}" for r in (external_id, *payment_refs))


def grant_payment(ctx: Ctx, *, external_id: str, wallet_id: str, offer: Offer, amount_minor: int, currency: str,
                  payment_ref: str | None = None, entitlement_id: str | None = None,
                  expires_at: datetime | None = None) -> bool:
    """Credit the offer's credits for a received payment, once, as a bucket expiring at ``expires_at`` (None:
    never). False when the payment was already recorded."""
    if _payment(ctx, [external_id]) is not None:
        ctx.ignore(f"payment {external_id} was already credited")
        return False
    refuse_closed_wallet(ctx, wallet_id)
    kind = TransactionKind.SUBSCRIPTION_GRANT if offer.kind == "plan" else TransactionKind.TOP_UP
    posted = service.grant_credits(
        ctx.conn, wallet_id=wallet_id, amount_minor=offer.credits_minor, kind=kind,
        idempotency_key=f"pay:{ctx.project_id}:{ctx.provider}:{external_id}",
        source_ref=f"{ctx.provider}:{external_id}", expires_at=expires_at,
        metadata={"provider": ctx.provider, "offer": offer.slug, "event_id": ctx.event_id,
                  "amount_minor": amount_minor, "currency": currency, **({"payment_ref": payment_ref} if payment_ref
                                                                          else {})})
    payment_id = f"pay_{uuid.uuid4().hex[:20]}"
    ctx.conn.execute(text("""
        INSERT INTO payments (id, project_id, provider, external_id, payment_ref, wallet_id, offer_id, entitlement_id,
                              amount_minor, currency, credits_minor, grant_transaction_id, credits_expire_at)
        VALUES (:id, :p, :v, :x, :r, :w, :o, :e, :a, :c, :cr, :t, :exp)"""),
                     {"id": payment_id, "p": ctx.project_id, "v": ctx.provider, "x": external_id,
                      "r": payment_ref, "w": wallet_id, "o": offer.id, "e": entitlement_id, "a": amount_minor,
                      "c": currency.lower(), "cr": offer.credits_minor, "t": posted.transaction.id,
                      "exp": expires_at})
    if payment_ref:
        _add_ref(ctx, payment_id, payment_ref)
    if posted.outcome == "created":
        ctx.transaction_ids.append(posted.transaction.id)
    ctx.wakes.extend(f"pay:{r}" for r in (external_id, payment_ref) if r)
    return True


def link_payment_ref(ctx: Ctx, *, external_id: str, payment_ref: str) -> None:
    """Record a handle refunds and disputes of a payment will name (Stripe: a payment intent that paid an invoice,
    told by ``invoice_payment.paid`` or ``invoice.payments``) and wake the refunds/disputes deferred on it. An
    invoice paid by several payments gets every one linked. Before the payment itself is known the event is
    deferred until it is."""
    payment = _payment(ctx, [external_id])
    if payment is None:
        raise Defer(f"pay:{external_id}", f"no payment {external_id} yet (the invoice's payment has not arrived)")
    if payment["payment_ref"] is None:
        ctx.conn.execute(text("UPDATE payments SET payment_ref = :r, updated_at = now() WHERE id = :id"),
                         {"r": payment_ref, "id": payment["id"]})
    if not _add_ref(ctx, payment["id"], payment_ref):
        ctx.ignore(f"payment {external_id} is already linked to {payment_ref}")
        return
    ctx.notes.append(f"payment {external_id} linked to {payment_ref}")
    ctx.wakes.append(f"pay:{payment_ref}")


def reverse_payment(ctx: Ctx, *, refs: list[str | None], refunded_minor: int | None = None,
                    disputed_minor: int | None = None, monotonic: bool = True) -> None:
    """Record money given back (refund) or taken back (dispute) for a payment and claw back the matching share
    of its credits. Amounts are the provider's cumulative figures FOR THE HANDLE the event names (one payment
    intent of an invoice); the payment's totals are the sums over its handles (``payment_refs``). ``monotonic``
    keeps the larger of the stored and the given value (reordered partial refunds), False sets it (a won
    dispute, a reversed refund). A full refund or an open/lost dispute also ends the entitlement the payment
    paid for (``end_access``); a partial refund does not."""
    wanted = [r for r in refs if r]
    payment = _payment(ctx, wanted)
    if payment is None:
        raise Defer(f"pay:{wanted[0]}", f"no payment {wanted[0]} yet (refund or dispute before the purchase)")
    linked = {r.ref: r for r in ctx.conn.execute(text(
        "SELECT ref, refunded_minor, disputed_minor FROM payment_refs WHERE payment_id = :id"),
        {"id": payment["id"]}).all()}
    handle = next((r for r in wanted if r in linked), payment["payment_ref"] or payment["external_id"])
    before = linked.get(handle)
    old_refunded = before.refunded_minor if before else 0
    old_disputed = before.disputed_minor if before else 0
    new_refunded = old_refunded if refunded_minor is None else (
        max(old_refunded, refunded_minor) if monotonic else refunded_minor)
    new_disputed = old_disputed if disputed_minor is None else (
        max(old_disputed, disputed_minor) if monotonic else disputed_minor)
    ctx.conn.execute(text("""
        INSERT INTO payment_refs (payment_id, project_id, provider, ref, refunded_minor, disputed_minor)
        VALUES (:id, :p, :v, :r, :rf, :d)
        ON CONFLICT (payment_id, ref) DO UPDATE SET refunded_minor = :rf, disputed_minor = :d"""),
                     {"id": payment["id"], "p": ctx.project_id, "v": ctx.provider, "r": handle, "rf": new_refunded,
                      "d": new_disputed})
    refunded = sum(r.refunded_minor for k, r in linked.items() if k != handle) + new_refunded
    disputed = sum(r.disputed_minor for k, r in linked.items() if k != handle) + new_disputed
    paid = payment["amount_minor"]
    credits = payment["credits_minor"]
    reversed_money = min(paid, refunded + disputed)
    target = (-(-credits * reversed_money // paid) if paid > 0 else (credits if refunded + disputed > 0 else 0))
    # credits of the payment that already expired (breakage) are gone: never claw them back a second time
    if payment["grant_transaction_id"] is not None:
        target = min(target, credits - queries.expired_of_grant(ctx.conn, payment["grant_transaction_id"]))
    delta = target - payment["clawed_back_minor"]
    if credits == 0:
        ctx.notes.append(f"payment {payment['external_id']} granted no credits ($0): nothing to claw back")
    if delta:
        posted = service.adjust(
            ctx.conn, wallet_id=payment["wallet_id"], amount_minor=-delta,
            reason=f"{ctx.provider} {ctx.event_type}: {'claw back' if delta > 0 else 'restore'} credits of "
                   f"payment {payment['external_id']}",
            idempotency_key=f"reversal:{ctx.project_id}:{ctx.provider}:{ctx.event_id}:{payment['id']}",
            # a clawback takes what is left of the payment's own bucket first, then burn order, then debt
            burn_first_of=payment["grant_transaction_id"] if delta > 0 else None,
            metadata={"provider": ctx.provider, "event_id": ctx.event_id, "payment": payment["external_id"],
                      "refunded_minor": refunded, "disputed_minor": disputed})
        if posted.outcome == "created":
            ctx.transaction_ids.append(posted.transaction.id)
    status = ("disputed" if disputed > 0 else "refunded" if refunded >= paid and refunded > 0
              else "partially_refunded" if refunded > 0 else "paid")
    ctx.conn.execute(text("""
        UPDATE payments SET refunded_minor = :r, disputed_minor = :d, clawed_back_minor = :c, status = :s,
                            updated_at = now() WHERE id = :id"""),
                     {"r": refunded, "d": disputed, "c": target, "s": status, "id": payment["id"]})
    if status in ("refunded", "disputed") and payment["entitlement_id"] is not None and credits > 0:
        end_access(ctx, payment["entitlement_id"], f"payment {payment['external_id']} {status}")


# ----------------------------------------------------------------------------------------- entitlements


def find_entitlement(ctx: Ctx, external_subscription_id: str) -> Entitlement | None:
    row = ctx.conn.execute(text("""
        SELECT * FROM entitlements WHERE project_id = :p AND provider = :v AND external_subscription_id = :s
        FOR UPDATE"""), {"p": ctx.project_id, "v": ctx.provider, "s": external_subscription_id}).mappings().first()
    return Entitlement.of(row) if row else None


def end_access(ctx: Ctx, entitlement_id: str, why: str) -> None:
    """The customer got the money of the entitlement's payment back (full refund, chargeback): access ends now,
    for every provider alike. ``ended`` is final (a later won dispute restores credits, not the plan)."""
    row = ctx.conn.execute(text("SELECT external_subscription_id FROM entitlements WHERE id = :id"),
                           {"id": entitlement_id}).first()
    if row is None:
        return
    upsert_entitlement(ctx, external_subscription_id=row.external_subscription_id, status="ended", will_renew=False,
                       ended_at=ctx.at)
    ctx.notes.append(f"access ended: {why}")


def require_entitlement(ctx: Ctx, external_subscription_id: str) -> Entitlement:
    found = find_entitlement(ctx, external_subscription_id)
    if found is None:
        raise Defer(f"sub:{external_subscription_id}",
                    f"subscription {external_subscription_id} is not known yet (its purchase has not arrived)")
    return found


def upsert_entitlement(ctx: Ctx, *, external_subscription_id: str, status: str | None,
                       wallet_id: str | None = None, offer: Offer | None = None, will_renew: bool | None = None,
                       period_start: datetime | None = None, period_end: datetime | None = None,
                       customer_id: str | None = None, ended_at: datetime | None = None) -> Entitlement:
    """Create the entitlement (needs wallet and offer, else the event is deferred until its purchase arrives)
    or move it: state fields only when this event is not older than the state shown and it has not ended;
    the period only forward; the plan when a newer event names another plan."""
    existing = find_entitlement(ctx, external_subscription_id)
    if existing is None:
        if wallet_id is None or offer is None:
            raise Defer(f"sub:{external_subscription_id}",
                        f"subscription {external_subscription_id} is not known yet (its purchase has not arrived)")
        refuse_closed_wallet(ctx, wallet_id)
        row = ctx.conn.execute(text("""
            INSERT INTO entitlements (id, project_id, wallet_id, offer_id, provider, external_subscription_id,
                external_customer_id, status, will_renew, current_period_start, current_period_end, ended_at,
                state_at)
            VALUES (:id, :p, :w, :o, :v, :s, :c, :status, :renew, :ps, :pe, :ended, :at)
            RETURNING *"""), {
            "id": f"ent_{uuid.uuid4().hex[:20]}", "p": ctx.project_id, "w": wallet_id, "o": offer.id,
            "v": ctx.provider, "s": external_subscription_id, "c": customer_id, "status": status or "active",
            "renew": True if will_renew is None else will_renew, "ps": period_start, "pe": period_end,
            "ended": ended_at if status == "ended" else None, "at": ctx.at}).mappings().one()
        ctx.conn.execute(text("UPDATE entitlements SET past_due_since = :at WHERE id = :id AND status = 'past_due'"),
                         {"at": ctx.at, "id": row["id"]})
        record_change(ctx.conn, project_id=ctx.project_id, entitlement_id=row["id"], from_status=None,
                      to_status=row["status"], reason=f"{ctx.provider} {ctx.event_type}", at=ctx.at)
        ctx.wakes.append(f"sub:{external_subscription_id}")
        return Entitlement.of(row)
    newer = ctx.at >= existing.state_at and existing.status != "ended"
    row = ctx.conn.execute(text("""
        UPDATE entitlements SET
            status = CASE WHEN :newer AND CAST(:status AS text) IS NOT NULL THEN CAST(:status AS text)
                          ELSE status END,
            will_renew = CASE WHEN :newer AND CAST(:renew AS boolean) IS NOT NULL THEN CAST(:renew AS boolean)
                              ELSE will_renew END,
            ended_at = CASE WHEN :newer AND CAST(:status AS text) = 'ended'
                            THEN coalesce(CAST(:ended AS timestamptz), CAST(:at AS timestamptz)) ELSE ended_at END,
            offer_id = CASE WHEN :newer AND CAST(:o AS text) IS NOT NULL THEN CAST(:o AS text) ELSE offer_id END,
            external_customer_id = coalesce(external_customer_id, CAST(:c AS text)),
            current_period_start = CASE WHEN CAST(:pe AS timestamptz) > coalesce(current_period_end, '-infinity')
                                        THEN CAST(:ps AS timestamptz) ELSE current_period_start END,
            current_period_end = greatest(current_period_end, CAST(:pe AS timestamptz)),
            state_at = CASE WHEN :newer THEN CAST(:at AS timestamptz) ELSE state_at END,
            -- dunning: when it entered past_due (the grace period runs from there); cleared when it leaves
            past_due_since = CASE WHEN NOT (:newer AND CAST(:status AS text) IS NOT NULL) THEN past_due_since
                                  WHEN CAST(:status AS text) = 'past_due'
                                  THEN coalesce(past_due_since, CAST(:at AS timestamptz))
                                  ELSE NULL END,
            updated_at = now()
        WHERE id = :id RETURNING *"""), {
        "newer": newer, "status": status, "renew": will_renew, "ended": ended_at, "at": ctx.at,
        "o": offer.id if offer else None, "c": customer_id, "ps": period_start, "pe": period_end,
        "id": existing.id}).mappings().one()
    if not newer:
        ctx.notes.append("an older or post-end event: entitlement state kept")
    elif row["status"] != existing.status:
        record_change(ctx.conn, project_id=ctx.project_id, entitlement_id=existing.id, from_status=existing.status,
                      to_status=row["status"], reason=f"{ctx.provider} {ctx.event_type}", at=ctx.at)
    return Entitlement.of(row)


def period_credits_expiry(ctx: Ctx, offer: Offer, *, period_start: datetime | None,
                          period_end: datetime | None) -> datetime | None:
    """When the credits of a paid period expire: None for a plan whose credits roll over (``never``); else the
    period's end as the provider event states it, plus the plan's ``credits_grace_s``. An event that states no
    period end (Lemon Squeezy's subscription invoice) is taken to pay one interval of the plan starting at
    ``period_start`` (else at the event's time), and the event's detail says so. Only the event is read (not
    the entitlement), so the same event gives the same expiry whatever arrived before it."""
    if not offer.expires_with_period:
        return None
    end = period_end
    if end is None:
        start = period_start or ctx.at
        end = offer.period_end_after(start)
        ctx.notes.append(f"the event states no period end: the period is taken as {offer.interval_count} "
                         f"{offer.billing_interval}(s) from {start.isoformat()}, to {end.isoformat()}")
    expires_at = end + timedelta(seconds=offer.credits_grace_s)
    if expires_at <= datetime.now(UTC):
        ctx.notes.append(f"the period's credits expired at {expires_at.isoformat()}, before they arrived: the "
                         "expiry job posts them as expiry on its next run")
    return expires_at


def grant_period(ctx: Ctx, ent: Entitlement, *, external_id: str, amount_minor: int, currency: str,
                 period_start: datetime | None, period_end: datetime | None = None, offer: Offer | None = None,
                 payment_ref: str | None = None) -> None:
    """A paid subscription period: the plan's credits (expiring with the period when the plan says so), unless
    the period starts after the entitlement ended."""
    if ent.ended_at is not None and period_start is not None and period_start >= ent.ended_at:
        ctx.ignore("the subscription had ended before this period; no credits")
        return
    offer = offer or offer_by_id(ctx, ent.offer_id)
    if _payment(ctx, [external_id]) is not None:
        ctx.ignore(f"payment {external_id} was already credited")
        return
    grant_payment(ctx, external_id=external_id, wallet_id=ent.wallet_id, offer=offer, amount_minor=amount_minor,
                  currency=currency, payment_ref=payment_ref, entitlement_id=ent.id,
                  expires_at=period_credits_expiry(ctx, offer, period_start=period_start, period_end=period_end))
