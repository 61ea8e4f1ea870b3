"""The ledger's errors: a small hierarchy, each with a stable ``code`` (api/errors.py maps codes to HTTP).

``extra`` carries machine-readable details (ids, amounts) that the API puts into the problem body."""

from __future__ import annotations

from typing import Any, ClassVar


class LedgerError(Exception):
    code: ClassVar[str] = "ledger.error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(LedgerError):
    """Arguments that can never succeed (non-positive amounts, unknown kinds, missing reason)."""

    code = "ledger.invalid_request"


class UnknownWallet(LedgerError):
    code = "ledger.unknown_wallet"


class UnknownTransaction(LedgerError):
    code = "ledger.unknown_transaction"


class UnknownHold(LedgerError):
    code = "ledger.unknown_hold"


class WalletConflict(LedgerError):
    """A wallet id already belongs to another owner."""

    code = "ledger.wallet_conflict"


class InsufficientCredits(LedgerError):
    code = "ledger.insufficient_credits"


class WalletBlocked(LedgerError):
    """The wallet owes credits (usage posted beyond its balance); new access waits until it is settled."""

    code = "ledger.wallet_blocked"


class WalletClosed(WalletBlocked):
    """The wallet is closed (its end user's account erasure was requested): no new debits, reservations,
    grants or refunds. A ``WalletBlocked`` so callers that treat a blocked wallet as "cannot pay" (billing rules'
    skip) treat a closed one the same."""

    code = "ledger.wallet_closed"


class RefundExceedsCharge(LedgerError):
    code = "ledger.refund_exceeds_charge"


class NotRefundable(LedgerError):
    """Only charges (usage, debit, reservation_commit) can be refunded."""

    code = "ledger.not_refundable"


class HoldNotActive(LedgerError):
    code = "ledger.hold_not_active"


class UnknownBillingRule(LedgerError):
    code = "ledger.unknown_billing_rule"


class IdempotencyConflict(LedgerError):
    """The idempotency key was already used for a DIFFERENT request (a replay of the same one is fine)."""

    code = "ledger.idempotency_conflict"


#: HTTP statuses of these codes (api/errors.py serves them through STATUS_BY_CODE).
HTTP_STATUS: dict[str, int] = {
    InvalidRequest.code: 422,
    UnknownWallet.code: 404,
    UnknownTransaction.code: 404,
    UnknownHold.code: 404,
    UnknownBillingRule.code: 404,
    WalletConflict.code: 409,
    InsufficientCredits.code: 402,
    WalletBlocked.code: 402,
    WalletClosed.code: 409,
    RefundExceedsCharge.code: 422,
    NotRefundable.code: 409,
    HoldNotActive.code: 409,
    IdempotencyConflict.code: 409,
}
