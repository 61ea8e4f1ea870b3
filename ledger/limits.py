"""The numeric bounds of money and usage (DESIGN §2 invariant 8): every value that passes validation is
chargeable, with headroom below 2^63 (PostgreSQL ``bigint``, the ledger's amounts and balances).

Pure constants and one pure function; the ledger owns the contract, streams enforces it at its edge (an event
beyond a bound is dead-lettered with reason ``value_out_of_range``, before it touches a counter).

Why these numbers (2^63 − 1 ≈ 9.22 × 10^18):
- ``AMOUNT_MINOR_MAX`` = 10^15 minor units is the largest cumulative charge of ONE counter key (and so the
  largest single usage posting). 9,000 keys at the bound still fit in one balance: a wallet's balance, a
  bucket or a sum of postings cannot leave ``bigint``.
- ``UNITS_CUMULATIVE_MAX`` = 10^15 units per key and period (≈ 3 × 10^8 units per second for a month), and
  ``UNITS_PER_EVENT_MAX`` = 10^12 units in one event: far above any real metering, far below overflow.
- ``UNITS_FRACTION_DIGITS_MAX`` = 12 decimal places: a value such as 1e-300 would make every cumulative
  a 300-digit decimal string in checkpoints and ``numeric`` columns.
"""

from __future__ import annotations

from decimal import Decimal

from ledger.contracts import PriceModel

__all__ = [
    "AMOUNT_MINOR_MAX",
    "UNITS_CUMULATIVE_MAX",
    "UNITS_FRACTION_DIGITS_MAX",
    "UNITS_PER_EVENT_MAX",
    "price_units_max",
]

AMOUNT_MINOR_MAX = 10**15
UNITS_CUMULATIVE_MAX = Decimal(10**15)
UNITS_PER_EVENT_MAX = Decimal(10**12)
UNITS_FRACTION_DIGITS_MAX = 12

assert AMOUNT_MINOR_MAX * 9_000 < 2**63, "headroom: thousands of keys at the bound fit in one balance"


def price_units_max(model: PriceModel) -> Decimal:
    """The cumulative units of a key up to which ``price_minor(model, units) <= AMOUNT_MINOR_MAX`` is
    guaranteed, capped at ``UNITS_CUMULATIVE_MAX``. An upper bound of the price, not the price itself (cheap
    enough to check per event): units × the highest unit price of the model + every fee it can add; the free
    allowance is ignored, which only errs towards refusing earlier."""
    if model.model == "per_unit":
        rate, fees = model.unit_price_minor or Decimal(0), Decimal(0)
    elif model.model == "package":
        assert model.package_size is not None and model.package_price_minor is not None
        # ceil(u / size) × price <= u × price / size + price
        rate, fees = model.package_price_minor / model.package_size, model.package_price_minor
    else:  # graduated and volume: no tier prices a unit above the highest tier price; flat fees add up
        rate = max(t.unit_price_minor for t in model.tiers)
        fees = sum((t.flat_price_minor for t in model.tiers), Decimal(0))
    headroom = Decimal(AMOUNT_MINOR_MAX) - fees
    if headroom <= 0:
        return Decimal(0)
    if rate <= 0:
        return UNITS_CUMULATIVE_MAX
    return min(UNITS_CUMULATIVE_MAX, (headroom / rate).to_integral_value(rounding="ROUND_FLOOR"))
