"""bench.pipeline's money check: a drained phase must match exactly; a phase whose wait ended first may only be
behind (charged less), never over-charged, and no key may be posted twice. Balances are charges (negative)."""

from bench.pipeline import judge_totals


def test_a_drained_phase_must_match_every_wallet_exactly() -> None:
    assert judge_totals({"a": -10, "b": -5}, {"a": -10, "b": -5}, 0, complete=True) == (
        True, "2 wallets, 0 wrong, 0 duplicate keys")
    ok, detail = judge_totals({"a": -10, "b": -5}, {"a": -10, "b": -4}, 0, complete=True)
    assert not ok and "1 wrong" in detail


def test_an_undrained_phase_passes_while_wallets_are_only_behind() -> None:
    ok, detail = judge_totals({"a": -10, "b": -5, "c": -3}, {"a": -10, "b": -2}, 0, complete=False)
    assert ok
    assert detail.startswith("INCOMPLETE") and "2 behind" in detail and "0 over-charged" in detail


def test_an_undrained_phase_still_fails_on_an_over_charge_a_stray_wallet_or_a_duplicate_key() -> None:
    assert not judge_totals({"a": -10}, {"a": -11}, 0, complete=False)[0]
    assert not judge_totals({"a": -10}, {"a": -10, "stray": -1}, 0, complete=False)[0]
    assert not judge_totals({"a": -10}, {"a": -9}, 1, complete=False)[0]
    assert not judge_totals({"a": -10}, {"a": -9}, None, complete=False)[0]
