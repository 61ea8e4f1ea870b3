"""The access policy: a pure function from what is known about a request to a decision (no I/O).

The caller (api/access/access_decisions.py) reads the facts — the wallet's figures under its row lock, its active
plans, the feature's price and gate — and records whatever this returns. Rules run in a FIXED order; the first
that denies decides, so a request has exactly one reason:

0. ``wallet_closed`` → deny ``wallet_closed``: the wallet's account erasure was requested (ledger_0005
   ``closed_at``); nothing is granted to it, not even a free feature, until the erasure is cancelled. First,
   because a closed account must not be used whatever it still holds.
1. ``debt_block`` → deny ``wallet_blocked``: the wallet is in debt (DESIGN §2.4: blocked for new access until
   settled). First, because a refund or chargeback that claws credits back into debt must revoke access at
   once, whatever else the wallet has (an active plan, a free feature).
2. ``entitlement_gate`` → deny ``upgrade_required``: the feature requires an entitlement (any active plan, or
   one named plan) and the wallet has none that is active now.
3. ``credit_balance`` → deny ``insufficient_credits``: cost (unit cost × quantity) > available credits
   (balance − held − floor, the same figure the ledger's debit checks under the same lock).
4. otherwise allow: policy ``credit_balance`` with the cost, or ``no_cost`` for a feature that costs nothing.

An unknown feature is not a decision (the API answers 422 before calling this)."""

from __future__ import annotations

from dataclasses import dataclass

#: ``FeatureRule.requires_entitlement`` value meaning "any active plan"
ANY_PLAN = "*"

REASON_WALLET_CLOSED = "wallet_closed"
REASON_WALLET_BLOCKED = "wallet_blocked"
REASON_UPGRADE_REQUIRED = "upgrade_required"
REASON_INSUFFICIENT_CREDITS = "insufficient_credits"
REASONS = (REASON_WALLET_CLOSED, REASON_WALLET_BLOCKED, REASON_UPGRADE_REQUIRED, REASON_INSUFFICIENT_CREDITS)

POLICY_WALLET_CLOSED = "wallet_closed"
POLICY_DEBT_BLOCK = "debt_block"
POLICY_ENTITLEMENT_GATE = "entitlement_gate"
POLICY_CREDIT_BALANCE = "credit_balance"
POLICY_NO_COST = "no_cost"
#: evaluation order (documentation and tests)
RULE_ORDER = (POLICY_WALLET_CLOSED, POLICY_DEBT_BLOCK, POLICY_ENTITLEMENT_GATE, POLICY_CREDIT_BALANCE)


@dataclass(frozen=True, slots=True)
class FeatureRule:
    feature_key: str
    unit_cost_minor: int
    requires_entitlement: str | None = None  # None, ANY_PLAN, or a plan offer slug


@dataclass(frozen=True, slots=True)
class WalletFacts:
    """The wallet as the check sees it; a subject without a wallet yet is ``WalletFacts.empty()``."""

    debt_minor: int
    available_minor: int
    active_plans: frozenset[str] = frozenset()  # slugs of the plans with an entitlement active now
    closed: bool = False  # account erasure requested (the ledger refuses its debits too)

    @classmethod
    def empty(cls) -> WalletFacts:
        return cls(debt_minor=0, available_minor=0)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str | None  # None when allowed
    policy_id: str
    cost_minor: int


def _entitled(rule: FeatureRule, plans: frozenset[str]) -> bool:
    if rule.requires_entitlement is None:
        return True
    if rule.requires_entitlement == ANY_PLAN:
        return bool(plans)
    return rule.requires_entitlement in plans


def evaluate(rule: FeatureRule, quantity: int, wallet: WalletFacts) -> Decision:
    """The decision for ``quantity`` uses of ``rule``'s feature by ``wallet`` (rules in the module's order)."""
    if quantity < 1:
        raise ValueError("quantity must be at least 1")
    if rule.unit_cost_minor < 0:
        raise ValueError("a feature's cost is never negative")
    cost = rule.unit_cost_minor * quantity
    if wallet.closed:
        return Decision(False, REASON_WALLET_CLOSED, POLICY_WALLET_CLOSED, cost)
    if wallet.debt_minor > 0:
        return Decision(False, REASON_WALLET_BLOCKED, POLICY_DEBT_BLOCK, cost)
    if not _entitled(rule, wallet.active_plans):
        return Decision(False, REASON_UPGRADE_REQUIRED, POLICY_ENTITLEMENT_GATE, cost)
    if cost > wallet.available_minor:
        return Decision(False, REASON_INSUFFICIENT_CREDITS, POLICY_CREDIT_BALANCE, cost)
    return Decision(True, None, POLICY_CREDIT_BALANCE if cost > 0 else POLICY_NO_COST, cost)


def lost_race(decision: Decision) -> Decision:
    """An allowed decision whose debit the ledger refused (another debit got there first): a denial, never an
    overspend."""
    return Decision(False, REASON_INSUFFICIENT_CREDITS, POLICY_CREDIT_BALANCE, decision.cost_minor)
