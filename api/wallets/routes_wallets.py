"""Wallets: create (per user, per project, per subject), read balances, list, buckets, transactions, holds.

Money moves in ``api.wallets.routes_wallet_ops``. A wallet of another project is 404 here, exactly like a missing one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import Connection, text

from api.deps import ConnectionDep, SettingsDep
from api.errors import ApiError, NotFound
from api.pagination import LIMIT_DEFAULT, LIMIT_MAX
from api.settings import ApiSettings
from api.tenancy.audit import audit
from api.tenancy.auth import ProjectAccess, require_project
from api.wallets import signup_bonus, wallet_directory
from api.wallets.geoip import GeoIpLookup, lookup_for
from api.wallets.wallet_models import (
    BonusOut,
    BucketOut,
    HoldOut,
    SignupFacts,
    TransactionOut,
    TransactionPageOut,
    WalletCreate,
    WalletCreatedOut,
    WalletListItemOut,
    WalletListPage,
    WalletOut,
    WalletPatch,
)
from ledger import queries, service
from ledger.rows import WalletRow
from streams import catalog

router = APIRouter(prefix="/api/v1/projects/{project_id}/wallets", tags=["wallets"])
Read = Annotated[ProjectAccess, require_project("read")]
Admin = Annotated[ProjectAccess, require_project("admin")]
TX_KINDS = Literal["top_up", "usage", "debit", "refund", "bonus", "promo", "subscription_grant", "expiry",
                   "adjustment", "reservation_commit"]


def wallet_in_project(conn: Connection, *, project_id: str, wallet_id: str) -> WalletRow:
    wallet = queries.get_wallet(conn, wallet_id)
    if wallet is None or wallet.project_id != project_id:
        raise NotFound("wallet not found", extra={"wallet_id": wallet_id})
    return wallet


def _wallet_audit(w: WalletRow) -> dict[str, object]:
    return {"owner_kind": w.owner_kind, "owner_ref": w.owner_ref, "credit_code": w.credit_code,
            "credit_scale": w.credit_scale, "floor_minor": w.floor_minor}


def _subject_wallet_id(conn: Connection, project_id: str, subject: str) -> str:
    """The wallet a subject's usage is charged to, so the API and the stream workers agree on ONE wallet.

    An existing subject key wins; otherwise the subject's deterministic auto-provisioned id is used (adopting a
    wallet the ledger already created from usage) and the key is recorded, so usage reaches this wallet even
    under the ``dead_letter`` unknown-subject policy."""
    mapped = conn.execute(text("SELECT wallet_id FROM subject_keys WHERE project_id = :p AND subject = :s"),
                          {"p": project_id, "s": subject}).scalar()
    if mapped is not None:
        return str(mapped)
    return catalog.set_subject_key(conn, project_id=project_id, subject=subject).wallet_id


def _bonus(conn: Connection, settings: ApiSettings, *, project_id: str, wallet_id: str, body: WalletCreate,
           created: bool) -> BonusOut:
    """The sign-up bonus of a subject (end-user) wallet: decided and granted on creation; a retry (the wallet
    exists) answers the recorded decision."""
    if created:
        facts = body.signup or SignupFacts()
        decision, transaction_id = signup_bonus.grant_signup_bonus(
            conn, project_id=project_id, wallet_id=wallet_id,
            facts=signup_bonus.SignupFacts(country=facts.country, ip=str(facts.ip) if facts.ip else None,
                                           device_id=facts.device_id),
            device_secret=signup_bonus.device_secret(settings), geoip=_geoip(settings))
    else:
        found = signup_bonus.recorded(conn, project_id, wallet_id)
        decision = found or signup_bonus.Decision(0, "existing_wallet", None, "none")
        transaction_id = signup_bonus.transaction_id_of(conn, project_id, wallet_id) if found else None
    return BonusOut(granted_minor=decision.granted_minor, reason=decision.reason,
                    detail=signup_bonus.REASONS[decision.reason], country=decision.country,
                    country_source=decision.country_source, expires_at=decision.expires_at,
                    transaction_id=transaction_id)


def _geoip(settings: ApiSettings) -> GeoIpLookup | None:
    return lookup_for(settings.geoip_database_path) if settings.geoip_database_path else None


@router.post("", status_code=201, response_model=WalletCreatedOut,
             summary="Create the wallet of a member, the project or a subject (admin); existing → 200. A subject "
                     "(end-user) wallet gets the project's sign-up bonus",
             responses={200: {"model": WalletCreatedOut, "description": "the wallet already existed (a subject "
                                                                       "wallet answers its recorded bonus)"},
                        422: {"description": "owner_ref is not a member of the project"}})
def create_wallet(body: WalletCreate, access: Admin, conn: ConnectionDep, response: Response,
                  settings: SettingsDep) -> WalletCreatedOut:
    owner_ref = access.project_id if body.owner_kind == "project" else str(body.owner_ref)
    if body.owner_kind == "user":
        is_member = conn.execute(text("SELECT 1 FROM project_members WHERE project_id = :p AND user_id = :u"),
                                 {"p": access.project_id, "u": owner_ref}).first()
        if not is_member:
            raise ApiError("a user wallet belongs to a member of the project", status=422,
                           extra={"owner_ref": owner_ref})
    existing = conn.execute(text("SELECT id FROM wallets WHERE project_id = :p AND owner_kind = :k AND owner_ref = :r"),
                            {"p": access.project_id, "k": body.owner_kind, "r": owner_ref}).scalar()
    if existing is not None and body.owner_kind == "subject":
        found = wallet_in_project(conn, project_id=access.project_id, wallet_id=str(existing))
        if found.closed_at is not None:  # erasure pending: answer as it is, never map its subject again
            response.status_code = 200
            return WalletCreatedOut(**WalletOut.of(found).model_dump(),
                                    bonus=_bonus(conn, settings, project_id=access.project_id, wallet_id=found.id,
                                                 body=body, created=False))
    wallet_id = _subject_wallet_id(conn, access.project_id, owner_ref) if body.owner_kind == "subject" else None
    wallet = service.ensure_wallet(conn, project_id=access.project_id, owner_kind=body.owner_kind,
                                   owner_ref=owner_ref, wallet_id=wallet_id, credit_scale=body.credit_scale,
                                   credit_code=body.credit_code)
    if existing is not None:
        response.status_code = 200
        bonus = _bonus(conn, settings, project_id=access.project_id, wallet_id=wallet.id, body=body,
                       created=False) if body.owner_kind == "subject" else None
        return WalletCreatedOut(**WalletOut.of(wallet).model_dump(), bonus=bonus)
    if body.floor_minor is not None and body.floor_minor != wallet.floor_minor:
        wallet = service.set_floor(conn, wallet_id=wallet.id, floor_minor=body.floor_minor)
    bonus = None
    if body.owner_kind == "subject":
        bonus = _bonus(conn, settings, project_id=access.project_id, wallet_id=wallet.id, body=body, created=True)
        if bonus.granted_minor:
            wallet = wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet.id)
    audit(conn, access, action="wallet.create", target_kind="wallet", target_id=wallet.id,
          after={**_wallet_audit(wallet),
                 **({"bonus": bonus.model_dump(mode="json", exclude={"detail"})} if bonus else {})})
    return WalletCreatedOut(**WalletOut.of(wallet).model_dump(), bonus=bonus)


@router.get("", response_model=WalletListPage,
            summary="The project's wallets (oldest first) with their balance and who they are for; q searches "
                    "wallet id, owner, member email and subject")
def list_wallets(access: Read, conn: ConnectionDep, request: Request,
                 owner_kind: Literal["user", "project", "subject"] | None = None,
                 owner_ref: Annotated[str | None, Query(max_length=200)] = None,
                 q: Annotated[str | None, Query(max_length=200, description="case-insensitive substring of the id, "
                                                "owner, member email or subject")] = None,
                 cursor: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT) -> WalletListPage:
    entries, next_cursor = wallet_directory.list_wallets(
        conn, project_id=access.project_id, owner_kind=owner_kind, owner_ref=owner_ref, q=q, cursor=cursor,
        limit=limit, subjects=wallet_directory.usage_subjects(request))
    return WalletListPage(items=[WalletListItemOut.of_entry(e) for e in entries], next_cursor=next_cursor)


@router.get("/{wallet_id}", response_model=WalletOut,
            summary="A wallet and its balance split into available, held, floor and debt")
def read_wallet(wallet_id: str, access: Read, conn: ConnectionDep) -> WalletOut:
    return WalletOut.of(wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id))


@router.patch("/{wallet_id}", response_model=WalletOut, summary="Change the floor (admin); negative = overdraft")
def patch_wallet(wallet_id: str, body: WalletPatch, access: Admin, conn: ConnectionDep) -> WalletOut:
    before = wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    after = service.set_floor(conn, wallet_id=wallet_id, floor_minor=body.floor_minor)
    audit(conn, access, action="wallet.update", target_kind="wallet", target_id=wallet_id,
          before={"floor_minor": before.floor_minor}, after={"floor_minor": after.floor_minor})
    return WalletOut.of(after)


@router.get("/{wallet_id}/buckets", response_model=list[BucketOut],
            summary="Credit buckets in burn order (lowest priority first, then soonest expiry, then oldest)")
def buckets(wallet_id: str, access: Read, conn: ConnectionDep,
            include_empty: Annotated[bool, Query(description="also burned-out and expired buckets")] = False,
            ) -> list[BucketOut]:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    return [BucketOut.of(b) for b in queries.list_buckets(conn, wallet_id, include_empty=include_empty)]


@router.get("/{wallet_id}/transactions", response_model=TransactionPageOut,
            summary="Transactions, newest first, with balance before/after and the buckets each one touched")
def transactions(
    wallet_id: str, access: Read, conn: ConnectionDep,
    kind: Annotated[list[TX_KINDS] | None, Query(description="repeat for several kinds")] = None,
    since: Annotated[datetime | None, Query(description="inclusive, ISO 8601 with offset")] = None,
    until: Annotated[datetime | None, Query(description="exclusive")] = None,
    source_ref: Annotated[str | None, Query(max_length=200)] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT,
) -> TransactionPageOut:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    try:
        page = queries.list_transactions(conn, wallet_id=wallet_id, kinds=kind, since=since, until=until,
                                         source_ref=source_ref, cursor=cursor, limit=limit)
    except ValueError as exc:
        raise ApiError("the cursor is not one this API returned", status=422) from exc
    return TransactionPageOut(items=[TransactionOut.of(t) for t in page.items], next_cursor=page.next_cursor)


@router.get("/{wallet_id}/transactions/{transaction_id}", response_model=TransactionOut, summary="One transaction")
def transaction(wallet_id: str, transaction_id: int, access: Read, conn: ConnectionDep) -> TransactionOut:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    tx = queries.get_transaction(conn, transaction_id)
    if tx is None or tx.wallet_id != wallet_id:
        raise NotFound("transaction not found")
    return TransactionOut.of(tx)


@router.get("/{wallet_id}/reservations", response_model=list[HoldOut],
            summary="The wallet's reservations (holds), newest first; status filters (active, committed, voided, "
                    "expired)")
def reservations(wallet_id: str, access: Read, conn: ConnectionDep,
                 status: Literal["active", "committed", "voided", "expired"] | None = None,
                 limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT) -> list[HoldOut]:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    return [HoldOut.of(h) for h in queries.list_holds(conn, wallet_id, status=status, limit=limit)]


@router.get("/{wallet_id}/reservations/{hold_id}", response_model=HoldOut, summary="One reservation (hold)")
def reservation(wallet_id: str, hold_id: str, access: Read, conn: ConnectionDep) -> HoldOut:
    wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
    hold = queries.get_hold(conn, hold_id)
    if hold is None or hold.wallet_id != wallet_id:
        raise NotFound("reservation not found")
    return HoldOut.of(hold)
