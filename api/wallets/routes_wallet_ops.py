"""Money operations on a wallet, each behind an Idempotency-Key (see api/wallets/idempotency.py):

- ``debit``: charge now (an amount or a feature's configured cost) or refuse with 402 — never overspends;
- ``reservations``: hold credits for a while, then ``commit`` the actual cost or ``void``; holds left alone
  are released by the scheduler (``ledger.service.expire_holds``);
- ``refund``: give back all or part of a charge, never more than was charged in total;
- ``grants`` (admin): top-ups, bonuses, promos, subscription grants as buckets with priority and expiry;
- ``adjustments`` (admin): signed corrections with a required reason.

The ledger does the arithmetic and the locking (ledger/service.py); these routes check that the wallet, hold
or transaction belongs to the caller's project, price features, and record the audit entry in the same
transaction as the posting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from api.deps import ConnectionDep
from api.errors import ApiError, NotFound
from api.metrics import DEBIT_SECONDS
from api.tenancy.audit import audit
from api.tenancy.auth import DeferredAccess, ProjectAccess, require_project, require_project_deferred
from api.wallets.debit_batch import PendingDebit, batcher_of, close_batcher
from api.wallets.feature_costs import price_feature
from api.wallets.idempotency import HotTransaction, fingerprint, ledger_key, require_key, run_idempotent
from api.wallets.routes_wallets import wallet_in_project
from api.wallets.wallet_models import (
    AdjustmentRequest,
    BalanceOut,
    CommitOut,
    CommitRequest,
    DebitRequest,
    GrantRequest,
    HoldOut,
    HoldResultOut,
    PostingOut,
    RefundRequest,
    ReserveRequest,
    TransactionOut,
)
from ledger import queries, service
from ledger.errors import LedgerError
from ledger.postings import WalletBalance
from ledger.rows import HoldRow, PostingResult, WalletRow

router = APIRouter(prefix="/api/v1/projects/{project_id}/wallets/{wallet_id}", tags=["wallet operations"])
Write = Annotated[ProjectAccess, require_project("write")]
Admin = Annotated[ProjectAccess, require_project("admin")]
HotWrite = Annotated[DeferredAccess, require_project_deferred("write")]
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="unique per operation; send the same key (and body) to retry safely",
    examples=["job-77-debit"])]

MONEY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "missing Idempotency-Key (api.idempotency_key_required)"},
    402: {"description": "not enough available credits (ledger.insufficient_credits) or the wallet is in debt "
                         "(ledger.wallet_blocked)"},
    404: {"description": "no such wallet/hold/transaction in this project"},
    409: {"description": "the Idempotency-Key was used for a different request (api.idempotency_conflict)"},
}


async def shutdown(app: Any) -> None:
    """The debit batcher keeps its own connections (api/wallets/debit_batch.py): closed with the app."""
    await close_batcher(app.state)


def _balance(conn: Connection, wallet_id: str) -> dict[str, Any]:
    view = queries.get_balance(conn, wallet_id)
    assert view is not None
    return BalanceOut.of(view).model_dump(mode="json")


def _posting(conn: Connection, result: PostingResult) -> dict[str, Any]:
    return {"outcome": result.outcome, "transaction": TransactionOut.of(result.transaction).model_dump(mode="json"),
            "balance": _balance(conn, result.transaction.wallet_id)}


def _actor(access: ProjectAccess) -> dict[str, Any]:
    p = access.principal
    return {"actor": p.user_id if p.kind == "user" else p.key_id, "actor_kind": p.kind, "request_id": access.request_id}


def _amount(conn: Connection, access: ProjectAccess, body: DebitRequest | ReserveRequest) -> tuple[int, dict[str, Any]]:
    if body.feature_key is None:
        assert body.amount_minor is not None
        return body.amount_minor, {}
    amount, cost = price_feature(conn, project_id=access.project_id, feature_key=body.feature_key,
                                 quantity=body.quantity)
    return amount, {"feature_key": cost.feature_key, "quantity": body.quantity, "unit_cost_minor": cost.cost_minor}


def _tx_audit(result: PostingResult) -> dict[str, Any]:
    t = result.transaction
    return {"kind": t.kind, "amount_minor": t.amount_minor, "balance_before_minor": t.balance_before_minor,
            "balance_after_minor": t.balance_after_minor, "idempotency_key": t.idempotency_key}


def _hold_in_wallet(conn: Connection, *, hold_id: str, wallet_id: str) -> HoldRow:
    hold = queries.get_hold(conn, hold_id)
    if hold is None or hold.wallet_id != wallet_id:
        raise NotFound("reservation not found", extra={"hold_id": hold_id})
    return hold


# --- the hot routes: debit, reserve, commit ---------------------------------------------------------------
# async, one thread hop, two database round trips (api/wallets/idempotency.py HotTransaction, ledger/staged.py):
# [wallet lock, buckets, key's earlier use, record lookup] then [ledger write, audit + record, COMMIT].


def _audit_row(access: ProjectAccess, *, action: str, target_kind: str, target_id: str,
               after: dict[str, Any]) -> dict[str, Any]:
    p = access.principal
    return {"actor_kind": p.kind, "user_id": p.user_id, "key_id": p.key_id, "action": action,
            "target_kind": target_kind, "target_id": target_id, "after": after, "request_id": access.request_id}


def _balance_of(wallet: WalletRow, state: WalletBalance) -> dict[str, Any]:
    return BalanceOut.of(state).model_dump(mode="json")


def _hot(request: Request, deferred: DeferredAccess, idempotency_key: str | None, body: Any,
         work: Callable[[Connection, ProjectAccess, HotTransaction], Response]) -> Callable[[], Response]:
    client_key = require_key(idempotency_key)
    request_fingerprint = fingerprint(method=request.method, path=request.url.path, body=body)
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            access = deferred.resolve(conn)  # users: their role; API keys: nothing to read
            hot = HotTransaction(conn, project_id=access.project_id, key=client_key,
                                 request_fingerprint=request_fingerprint)
            return work(conn, access, hot)

    return run


def _debit_work(wallet_id: str, body: DebitRequest, client_key: str
                ) -> Callable[[Connection, ProjectAccess, HotTransaction], Response]:
    def work(conn: Connection, access: ProjectAccess, hot: HotTransaction) -> Response:
        stage = hot.stage(lambda: service.DebitStage(conn, wallet_id=wallet_id, project_id=access.project_id,
                                                     idempotency_key=ledger_key(access.project_id, client_key)))
        if isinstance(stage, Response):
            return stage
        wallet = stage.fetch()
        if wallet is None:
            raise NotFound("wallet not found", extra={"wallet_id": wallet_id})
        amount, pricing = _amount(conn, access, body)
        source_ref = body.source_ref or (f"feature:{body.feature_key}" if body.feature_key else None)
        duplicate = stage.duplicate(amount_minor=amount)  # a key older than its record (records are purged)
        with hot.write():
            posted = duplicate or stage.post(amount_minor=amount, source_ref=source_ref,
                                             metadata={**(body.metadata or {}), **pricing, **_actor(access)})
            if isinstance(posted, service.Posted):
                result, balance = posted.result, _balance_of(wallet, posted.balance)
            else:
                result, balance = posted, _balance_of(wallet, wallet.state)
            hot.store(201, {"outcome": result.outcome,
                            "transaction": TransactionOut.of(result.transaction).model_dump(mode="json"),
                            "balance": balance},
                      _audit_row(access, action="wallet.debit", target_kind="transaction",
                                 target_id=str(result.transaction.id),
                                 after={**_tx_audit(result), "wallet_id": wallet_id, **pricing}))
        assert hot.response is not None
        return hot.response

    return work


@router.post("/debit", status_code=201, response_model=PostingOut, responses=MONEY_ERRORS,
             summary="Charge now: an amount, or a feature's configured cost × quantity (member or admin key)")
async def debit(wallet_id: str, body: DebitRequest, request: Request, access: HotWrite,
                idempotency_key: IdempotencyKey = None) -> Response:
    return await debit_response(request, access, wallet_id, body, require_key(idempotency_key))


async def debit_response(request: Request, access: DeferredAccess, wallet_id: str, body: DebitRequest,
                         client_key: str) -> Response:
    """The debit (also answered by api/wallets/fast_debit.py without FastAPI's routing); raises a refusal. Timed into
    ``meterline_debit_seconds`` by outcome."""
    started = time.perf_counter()
    outcome = "error"
    try:
        response = await _debit_response(request, access, wallet_id, body, client_key)
        outcome = "ok" if response.status_code < 400 else "refused"
        return response
    except (ApiError, LedgerError):  # mapped to a 4xx problem (402 insufficient credits, 409, 404...)
        outcome = "refused"
        raise
    finally:
        DEBIT_SECONDS.labels(outcome).observe(time.perf_counter() - started)


async def _debit_response(request: Request, access: DeferredAccess, wallet_id: str, body: DebitRequest,
                          client_key: str) -> Response:
    body_json = body.model_dump(mode="json")
    if body.feature_key is None:  # group commit (api/wallets/debit_batch.py); it hands a debit back when it must run alone
        assert body.amount_minor is not None
        outcome = await batcher_of(request.app.state, request.app.state.engine).debit(PendingDebit(
            deferred=access, wallet_id=wallet_id, client_key=client_key,
            request_fingerprint=fingerprint(method=request.method, path=request.url.path, body=body_json),
            amount_minor=body.amount_minor, source_ref=body.source_ref, metadata=body.metadata))
        if isinstance(outcome, Response):
            return outcome
        if isinstance(outcome, BaseException):
            raise outcome
    run = _hot(request, access, client_key, body_json, _debit_work(wallet_id, body, client_key))
    return await run_in_threadpool(run)


def _reserve_work(wallet_id: str, body: ReserveRequest, client_key: str
                  ) -> Callable[[Connection, ProjectAccess, HotTransaction], Response]:
    def work(conn: Connection, access: ProjectAccess, hot: HotTransaction) -> Response:
        stage = hot.stage(lambda: service.ReserveStage(conn, wallet_id=wallet_id, project_id=access.project_id,
                                                       idempotency_key=ledger_key(access.project_id, client_key)))
        if isinstance(stage, Response):
            return stage
        wallet = stage.fetch()
        if wallet is None:
            raise NotFound("wallet not found", extra={"wallet_id": wallet_id})
        amount, pricing = _amount(conn, access, body)
        with hot.write():
            hold, state = stage.post(amount_minor=amount, timeout_s=body.timeout_s)
            hot.store(201, {"hold": HoldOut.of(hold).model_dump(mode="json"),
                            "balance": _balance_of(wallet, state or wallet.state)},
                      _audit_row(access, action="wallet.reserve", target_kind="hold", target_id=hold.id,
                                 after={"wallet_id": wallet_id, "amount_minor": amount,
                                        "expires_at": hold.expires_at, **pricing}))
        assert hot.response is not None
        return hot.response

    return work


@router.post("/reservations", status_code=201, response_model=HoldResultOut, responses=MONEY_ERRORS,
             summary="Hold credits for up to timeout_s (an amount or a feature's cost); commit or void it later")
async def reserve(wallet_id: str, body: ReserveRequest, request: Request, access: HotWrite,
                  idempotency_key: IdempotencyKey = None) -> Response:
    run = _hot(request, access, idempotency_key, body.model_dump(mode="json"),
               _reserve_work(wallet_id, body, require_key(idempotency_key)))
    return await run_in_threadpool(run)


def _commit_work(wallet_id: str, hold_id: str, body: CommitRequest, client_key: str
                 ) -> Callable[[Connection, ProjectAccess, HotTransaction], Response]:
    def work(conn: Connection, access: ProjectAccess, hot: HotTransaction) -> Response:
        stage = hot.stage(lambda: service.CommitStage(conn, wallet_id=wallet_id, hold_id=hold_id,
                                                      project_id=access.project_id,
                                                      idempotency_key=ledger_key(access.project_id, client_key)))
        if isinstance(stage, Response):
            return stage
        wallet = stage.fetch()
        if wallet is None:
            raise NotFound("wallet not found", extra={"wallet_id": wallet_id})
        if stage.hold is None or stage.hold.wallet_id != wallet_id:
            raise NotFound("reservation not found", extra={"hold_id": hold_id})
        duplicate = stage.duplicate(amount_minor=body.amount_minor)
        with hot.write():
            posted = duplicate or stage.post(amount_minor=body.amount_minor,
                                             metadata={**(body.metadata or {}), **_actor(access)})
            if isinstance(posted, service.Posted):
                result, balance = posted.result, _balance_of(wallet, posted.balance)
            else:
                result, balance = posted, _balance_of(wallet, wallet.state)
            hot.store(200, {"hold_id": hold_id,
                            "transaction": TransactionOut.of(result.transaction).model_dump(mode="json"),
                            "balance": balance},
                      _audit_row(access, action="wallet.commit", target_kind="hold", target_id=hold_id,
                                 after={**_tx_audit(result), "transaction_id": result.transaction.id}))
        assert hot.response is not None
        return hot.response

    return work


@router.post("/reservations/{hold_id}/commit", response_model=CommitOut,
             responses={**MONEY_ERRORS, 409: {"description": "the hold is committed, voided or expired "
                                                             "(ledger.hold_not_active), or key reuse"}},
             summary="Post the actual cost of a reserved operation and release the hold")
async def commit(wallet_id: str, hold_id: str, body: CommitRequest, request: Request, access: HotWrite,
                 idempotency_key: IdempotencyKey = None) -> Response:
    run = _hot(request, access, idempotency_key, body.model_dump(mode="json"),
               _commit_work(wallet_id, hold_id, body, require_key(idempotency_key)))
    return await run_in_threadpool(run)


@router.post("/reservations/{hold_id}/void", response_model=HoldResultOut, responses=MONEY_ERRORS,
             summary="Release a hold without charging (a committed hold cannot be voided)")
def void(wallet_id: str, hold_id: str, request: Request, access: Write, conn: ConnectionDep,
         idempotency_key: IdempotencyKey = None) -> JSONResponse:
    def operation(key: str) -> tuple[int, Any]:
        wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
        before = _hold_in_wallet(conn, hold_id=hold_id, wallet_id=wallet_id)
        hold = service.void_hold(conn, hold_id=hold_id)
        audit(conn, access, action="wallet.void", target_kind="hold", target_id=hold_id,
              before={"status": before.status}, after={"status": hold.status, "amount_minor": hold.amount_minor})
        return 200, {"hold": HoldOut.of(hold).model_dump(mode="json"), "balance": _balance(conn, wallet_id)}

    return run_idempotent(conn, request, project_id=access.project_id, key=idempotency_key, body=None,
                          operation=operation)


@router.post("/transactions/{transaction_id}/refund", status_code=201, response_model=PostingOut,
             responses={**MONEY_ERRORS, 422: {"description": "more than is left of the charge "
                                                             "(ledger.refund_exceeds_charge)"}},
             summary="Refund all or part of a charge (never more than charged, across all refunds)")
def refund(wallet_id: str, transaction_id: int, body: RefundRequest, request: Request, access: Write,
           conn: ConnectionDep, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    def operation(key: str) -> tuple[int, Any]:
        wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
        original = queries.get_transaction(conn, transaction_id)
        if original is None or original.wallet_id != wallet_id:
            raise NotFound("transaction not found", extra={"transaction_id": transaction_id})
        result = service.refund(conn, transaction_id=transaction_id, amount_minor=body.amount_minor,
                                idempotency_key=ledger_key(access.project_id, key), reason=body.reason,
                                metadata=_actor(access))
        audit(conn, access, action="wallet.refund", target_kind="transaction", target_id=str(result.transaction.id),
              after={**_tx_audit(result), "refunds_transaction_id": transaction_id, "reason": body.reason})
        return 201, _posting(conn, result)

    return run_idempotent(conn, request, project_id=access.project_id, key=idempotency_key,
                          body=body.model_dump(mode="json"), operation=operation)


@router.post("/grants", status_code=201, response_model=PostingOut, responses=MONEY_ERRORS,
             summary="Grant credits as a bucket (admin): top-up, bonus, promo or subscription grant; "
                     "debt is settled first")
def grant(wallet_id: str, body: GrantRequest, request: Request, access: Admin, conn: ConnectionDep,
          idempotency_key: IdempotencyKey = None) -> JSONResponse:
    def operation(key: str) -> tuple[int, Any]:
        wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
        result = service.grant_credits(conn, wallet_id=wallet_id, amount_minor=body.amount_minor,
                                       idempotency_key=ledger_key(access.project_id, key), kind=body.kind,
                                       source=body.source, priority=body.priority, expires_at=body.expires_at,
                                       source_ref=body.source_ref, reason=body.reason, metadata=_actor(access))
        audit(conn, access, action="wallet.grant", target_kind="transaction", target_id=str(result.transaction.id),
              after={**_tx_audit(result), "wallet_id": wallet_id, "source": body.source or body.kind,
                     "priority": body.priority, "expires_at": body.expires_at, "reason": body.reason})
        return 201, _posting(conn, result)

    return run_idempotent(conn, request, project_id=access.project_id, key=idempotency_key,
                          body=body.model_dump(mode="json"), operation=operation)


@router.post("/adjustments", status_code=201, response_model=PostingOut, responses=MONEY_ERRORS,
             summary="Correct a balance (admin) with a required reason; negative adjustments may create debt")
def adjustment(wallet_id: str, body: AdjustmentRequest, request: Request, access: Admin, conn: ConnectionDep,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    def operation(key: str) -> tuple[int, Any]:
        wallet_in_project(conn, project_id=access.project_id, wallet_id=wallet_id)
        result = service.adjust(conn, wallet_id=wallet_id, amount_minor=body.amount_minor, reason=body.reason,
                                idempotency_key=ledger_key(access.project_id, key), metadata=_actor(access))
        audit(conn, access, action="wallet.adjust", target_kind="transaction", target_id=str(result.transaction.id),
              after={**_tx_audit(result), "wallet_id": wallet_id, "reason": body.reason})
        return 201, _posting(conn, result)

    return run_idempotent(conn, request, project_id=access.project_id, key=idempotency_key,
                          body=body.model_dump(mode="json"), operation=operation)
