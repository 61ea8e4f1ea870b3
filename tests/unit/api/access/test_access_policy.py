"""The pure access policy (api/access/access_policy.py): each rule, and the fixed order in which they decide."""

from __future__ import annotations

import itertools

import pytest

from api.access.access_policy import (
    ANY_PLAN,
    POLICY_CREDIT_BALANCE,
    POLICY_DEBT_BLOCK,
    POLICY_ENTITLEMENT_GATE,
    POLICY_NO_COST,
    POLICY_WALLET_CLOSED,
    REASON_INSUFFICIENT_CREDITS,
    REASON_UPGRADE_REQUIRED,
    REASON_WALLET_BLOCKED,
    REASON_WALLET_CLOSED,
    RULE_ORDER,
    Decision,
    FeatureRule,
    WalletFacts,
    evaluate,
    lost_race,
)

GEN = FeatureRule("gen", 5)
RICH = WalletFacts(debt_minor=0, available_minor=100)


def test_allowed_with_the_cost_of_all_uses() -> None:
    assert evaluate(GEN, 3, RICH) == Decision(True, None, POLICY_CREDIT_BALANCE, 15)


def test_exactly_the_available_credits_is_enough_one_more_is_not() -> None:
    assert evaluate(GEN, 20, RICH).allowed
    assert evaluate(GEN, 21, RICH) == Decision(False, REASON_INSUFFICIENT_CREDITS, POLICY_CREDIT_BALANCE, 105)


def test_a_free_feature_is_allowed_with_nothing_available_and_says_so() -> None:
    assert evaluate(FeatureRule("free", 0), 7, WalletFacts.empty()) == Decision(True, None, POLICY_NO_COST, 0)


def test_debt_blocks_everything_even_free_features_and_entitled_wallets() -> None:
    in_debt = WalletFacts(debt_minor=1, available_minor=0, active_plans=frozenset({"pro"}))
    for rule in (GEN, FeatureRule("free", 0), FeatureRule("pro_only", 0, "pro")):
        assert evaluate(rule, 1, in_debt) == Decision(False, REASON_WALLET_BLOCKED, POLICY_DEBT_BLOCK,
                                                      rule.unit_cost_minor)


def test_entitlement_gate_any_plan() -> None:
    gated = FeatureRule("export", 0, ANY_PLAN)
    assert evaluate(gated, 1, RICH) == Decision(False, REASON_UPGRADE_REQUIRED, POLICY_ENTITLEMENT_GATE, 0)
    subscribed = WalletFacts(debt_minor=0, available_minor=0, active_plans=frozenset({"basic"}))
    assert evaluate(gated, 1, subscribed) == Decision(True, None, POLICY_NO_COST, 0)


def test_entitlement_gate_a_named_plan() -> None:
    gated = FeatureRule("upscale", 2, "pro")
    basic = WalletFacts(debt_minor=0, available_minor=50, active_plans=frozenset({"basic"}))
    pro = WalletFacts(debt_minor=0, available_minor=50, active_plans=frozenset({"basic", "pro"}))
    assert evaluate(gated, 1, basic).reason == REASON_UPGRADE_REQUIRED
    assert evaluate(gated, 1, pro) == Decision(True, None, POLICY_CREDIT_BALANCE, 2)


def test_an_entitled_wallet_still_pays_for_what_costs_credits() -> None:
    gated = FeatureRule("upscale", 30, ANY_PLAN)
    poor_pro = WalletFacts(debt_minor=0, available_minor=10, active_plans=frozenset({"pro"}))
    assert evaluate(gated, 1, poor_pro) == Decision(False, REASON_INSUFFICIENT_CREDITS, POLICY_CREDIT_BALANCE, 30)


@pytest.mark.parametrize("closed,in_debt,entitled,enough", list(itertools.product([True, False], repeat=4)))
def test_the_first_failing_rule_in_order_decides(closed: bool, in_debt: bool, entitled: bool, enough: bool) -> None:
    rule = FeatureRule("f", 10, "pro")
    wallet = WalletFacts(debt_minor=5 if in_debt else 0, available_minor=10 if enough else 9,
                         active_plans=frozenset({"pro"}) if entitled else frozenset(), closed=closed)
    passes = (not closed, not in_debt, entitled, enough)
    failing = [policy for policy, ok in zip(RULE_ORDER, passes, strict=True) if not ok]
    decision = evaluate(rule, 1, wallet)
    assert RULE_ORDER == (POLICY_WALLET_CLOSED, POLICY_DEBT_BLOCK, POLICY_ENTITLEMENT_GATE, POLICY_CREDIT_BALANCE)
    if failing:
        assert not decision.allowed and decision.policy_id == failing[0]
    else:
        assert decision == Decision(True, None, POLICY_CREDIT_BALANCE, 10)


def test_a_closed_wallet_gets_not_even_a_free_feature() -> None:
    free = FeatureRule("ping", 0)
    closed = WalletFacts(debt_minor=0, available_minor=1_000, active_plans=frozenset({"pro"}), closed=True)
    assert evaluate(free, 1, closed) == Decision(False, REASON_WALLET_CLOSED, POLICY_WALLET_CLOSED, 0)


def test_a_lost_race_is_a_denial_for_lack_of_credits() -> None:
    assert lost_race(evaluate(GEN, 1, RICH)) == Decision(False, REASON_INSUFFICIENT_CREDITS, POLICY_CREDIT_BALANCE, 5)


def test_nonsense_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        evaluate(GEN, 0, RICH)
    with pytest.raises(ValueError):
        evaluate(FeatureRule("neg", -1), 1, RICH)
