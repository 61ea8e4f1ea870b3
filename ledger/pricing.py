"""Pure pricing: cumulative units of a period -> cumulative price in integer minor units.

The ledger never prices an increment. It prices the whole period's merged units and charges the
difference to what it charged before (``delta_minor``). Because the posted deltas telescope, the sum of
everything ever posted for a key equals ``price_minor(model, final_units)`` for any way the units arrived
— no rounding drift, whatever the model (DESIGN §2.2). Fractions of a minor unit stay inside the
cumulative until they add up to a whole one.

All arithmetic is Decimal under a wide context, then floored once at the end.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal, localcontext

from ledger.contracts import PriceModel, PriceTier

__all__ = ["combine_units", "continued_prices_minor", "delta_minor", "price_exact", "price_minor"]

_ZERO = Decimal(0)
#: Wide enough that units up to 10^30 times prices with 20 decimals multiply without rounding.
_PRECISION = 100


def price_minor(model: PriceModel, units: Decimal) -> int:
    """The cumulative price of ``units`` (a period's total) in whole minor units, floored."""
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        exact = price_exact(model, units)
        return int(exact.to_integral_value(rounding=ROUND_FLOOR))


def delta_minor(model: PriceModel, *, units: Decimal, charged_minor: int) -> int:
    """What to charge now (positive) or credit back (negative) so the total charged equals the price."""
    return price_minor(model, units) - charged_minor


def combine_units(aggregation: str, before: Decimal, after: Decimal) -> Decimal:
    """The period's units once ``after`` (a later price version's units) follows ``before``: sum, count and
    unique_count add up; max is the larger; latest is the later version's value."""
    if aggregation == "max":
        return max(before, after)
    if aggregation == "latest":
        return after
    return before + after


def continued_prices_minor(runs: list[tuple[PriceModel, str, Decimal]]) -> list[int]:
    """The cumulative charge of each price version of ONE (wallet, meter, period, meter version), given in
    the order the versions took effect as (model, aggregation, units).

    A new price version continues the period (DESIGN §2 invariant 9): version i prices its units at the tier
    position the earlier versions left, ``price_i(before + units_i) − price_i(before)`` where ``before`` is the
    combined units of versions 0..i−1. So a free allowance and tiers carry over, and units after the change are
    priced by the new version (900 + 900 tokens with 1,000 free → 0, then 800 charged units). A pure function of
    the final units: the order in which they arrived — late events of an earlier version included — cannot
    change the result, which is what lets the ledger charge it exactly once (Σ posted = this, per key)."""
    out: list[int] = []
    before: Decimal | None = None
    for model, aggregation, units in runs:
        if before is None:
            out.append(price_minor(model, units))
            before = units
            continue
        total = combine_units(aggregation, before, units)
        out.append(price_minor(model, total) - price_minor(model, before))
        before = total
    return out


def price_exact(model: PriceModel, units: Decimal) -> Decimal:
    """The unrounded price. Units below the free allowance (and negative gauge values) cost nothing."""
    billable = max(units - model.free_units, _ZERO)
    if billable == 0:
        return _ZERO
    if model.model == "per_unit":
        assert model.unit_price_minor is not None  # guaranteed by PriceModel validation
        return billable * model.unit_price_minor
    if model.model == "package":
        assert model.package_size is not None and model.package_price_minor is not None
        packages = math.ceil(billable / model.package_size)  # a started package is a whole package
        return packages * model.package_price_minor
    if model.model == "graduated":
        return _graduated(model.tiers, billable)
    return _volume(model.tiers, billable)


def _graduated(tiers: tuple[PriceTier, ...], units: Decimal) -> Decimal:
    """Each tier prices the slice of units inside (lower, up_to]; flat fee once its slice is non-empty."""
    total = _ZERO
    lower = _ZERO
    for tier in tiers:
        upper = tier.up_to if tier.up_to is not None else units
        slice_units = min(units, upper) - lower
        if slice_units <= 0:
            break
        total += slice_units * tier.unit_price_minor + tier.flat_price_minor
        lower = upper
    return total


def _volume(tiers: tuple[PriceTier, ...], units: Decimal) -> Decimal:
    """Every unit at the price of the tier the total falls in (lower < units <= up_to)."""
    for tier in tiers:
        if tier.up_to is None or units <= tier.up_to:
            return units * tier.unit_price_minor + tier.flat_price_minor
    raise AssertionError("PriceModel validation guarantees an unbounded last tier")
