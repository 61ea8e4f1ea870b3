"""Pricing is a pure function of cumulative units; the ledger charges differences of it (DESIGN §2.2)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ledger.contracts import PriceModel, PriceTier
from ledger.pricing import delta_minor, price_minor

D = Decimal

prices = st.decimals(min_value=0, max_value=50, places=3, allow_nan=False, allow_infinity=False)
units_st = st.decimals(min_value=0, max_value=5000, places=2, allow_nan=False, allow_infinity=False)


@st.composite
def tier_lists(draw: st.DrawFn) -> tuple[PriceTier, ...]:
    bounds = sorted(set(draw(st.lists(st.integers(1, 3000), min_size=0, max_size=4))))
    ups: list[Decimal | None] = [D(b) for b in bounds] + [None]
    return tuple(PriceTier(up_to=u, unit_price_minor=draw(prices),
                           flat_price_minor=draw(st.sampled_from([D(0), D(0), D(25), D("0.5")]))) for u in ups)


@st.composite
def price_models(draw: st.DrawFn) -> PriceModel:
    free = draw(st.sampled_from([D(0), D(0), D(10), D("2.5")]))
    kind = draw(st.sampled_from(["per_unit", "package", "graduated", "volume"]))
    if kind == "per_unit":
        return PriceModel(model="per_unit", unit_price_minor=draw(prices), free_units=free)
    if kind == "package":
        return PriceModel(model="package", package_size=draw(st.sampled_from([D(1), D(10), D(1000), D("0.5")])),
                          package_price_minor=draw(prices), free_units=free)
    return PriceModel(model=kind, tiers=draw(tier_lists()), free_units=free)


@given(model=price_models(), increments=st.lists(units_st, min_size=1, max_size=30))
@settings(max_examples=400, deadline=None)
def test_any_split_of_units_posts_exactly_the_price_of_the_total(model: PriceModel, increments: list[Decimal]) -> None:
    charged = 0
    posted: list[int] = []
    cumulative = D(0)
    for step in increments:
        cumulative += step
        delta = delta_minor(model, units=cumulative, charged_minor=charged)
        posted.append(delta)
        charged += delta
    assert sum(posted) == price_minor(model, sum(increments, D(0)))


def _tier_of_unit(tiers: tuple[PriceTier, ...], unit_index: int) -> int:
    """Index of the tier that unit number ``unit_index`` (1-based) falls in."""
    for i, tier in enumerate(tiers):
        if tier.up_to is None or unit_index <= tier.up_to:
            return i
    raise AssertionError


@given(tiers=tier_lists(), units=st.integers(0, 3500))
@settings(max_examples=200, deadline=None)
def test_graduated_is_the_sum_of_each_unit_at_its_own_tier(tiers: tuple[PriceTier, ...], units: int) -> None:
    # independent: walk unit by unit, add each unit's tier price, plus the flat fee of every tier touched
    expected = D(0)
    touched: set[int] = set()
    for n in range(1, units + 1):
        i = _tier_of_unit(tiers, n)
        expected += tiers[i].unit_price_minor
        touched.add(i)
    expected += sum((tiers[i].flat_price_minor for i in touched), D(0))
    assert price_minor(PriceModel(model="graduated", tiers=tiers), D(units)) == math.floor(expected)


@given(tiers=tier_lists(), units=st.integers(1, 3500))
@settings(max_examples=200, deadline=None)
def test_volume_prices_every_unit_at_the_reached_tier(tiers: tuple[PriceTier, ...], units: int) -> None:
    reached = tiers[_tier_of_unit(tiers, units)]
    expected = units * reached.unit_price_minor + reached.flat_price_minor
    assert price_minor(PriceModel(model="volume", tiers=tiers), D(units)) == math.floor(expected)


def test_volume_crossing_into_a_cheaper_tier_gives_a_negative_delta() -> None:
    model = PriceModel(model="volume", tiers=(PriceTier(up_to=D(100), unit_price_minor=D(1)),
                                              PriceTier(unit_price_minor=D("0.5"))))
    assert price_minor(model, D(100)) == 100
    assert delta_minor(model, units=D(101), charged_minor=100) == 50 - 100  # 101 × 0.5 = 50.5 → 50


@given(model=price_models(), units=units_st)
@settings(max_examples=300, deadline=None)
def test_free_allowance_is_taken_off_the_units_before_pricing(model: PriceModel, units: Decimal) -> None:
    without_free = model.model_copy(update={"free_units": D(0)})
    assert price_minor(model, units) == price_minor(without_free, max(units - model.free_units, D(0)))


def test_free_allowance_examples() -> None:
    model = PriceModel(model="per_unit", unit_price_minor=D(2), free_units=D(100))
    assert [price_minor(model, D(u)) for u in (0, 99, 100, 101, 150)] == [0, 0, 0, 2, 100]


@pytest.mark.parametrize(("units", "expected"), [(0, 0), (1, 7), (10, 7), ("10.01", 14), (11, 14), (20, 14), (21, 21)])
def test_package_rounds_a_started_package_up(units: object, expected: int) -> None:
    model = PriceModel(model="package", package_size=D(10), package_price_minor=D(7))
    assert price_minor(model, D(str(units))) == expected


@given(size=st.sampled_from([D(1), D(3), D(10), D("0.5")]), price=prices, units=units_st)
def test_package_is_ceil_of_packages_times_price(size: Decimal, price: Decimal, units: Decimal) -> None:
    model = PriceModel(model="package", package_size=size, package_price_minor=price)
    assert price_minor(model, units) == math.floor(math.ceil(units / size) * price)


def test_worked_example_of_design_2_2() -> None:
    model = PriceModel(model="per_unit", unit_price_minor=D("0.4"))
    assert price_minor(model, D(90)) == 36
    assert delta_minor(model, units=D(93), charged_minor=36) == 1  # 37.2 → 37; the 0.2 stays in the cumulative


@given(model=price_models(), a=units_st, b=units_st)
def test_non_volume_prices_never_decrease(model: PriceModel, a: Decimal, b: Decimal) -> None:
    if model.model != "volume":
        low, high = sorted((a, b))
        assert price_minor(model, low) <= price_minor(model, high)


def test_negative_gauge_units_cost_nothing() -> None:
    assert price_minor(PriceModel(model="per_unit", unit_price_minor=D(3)), D(-5)) == 0


@pytest.mark.parametrize("bad", [
    {"model": "per_unit"},
    {"model": "per_unit", "unit_price_minor": 0.4},
    {"model": "per_unit", "unit_price_minor": "-1"},
    {"model": "per_unit", "unit_price_minor": "1", "tiers": [{"unit_price_minor": "1"}]},
    {"model": "package", "package_size": "0", "package_price_minor": "1"},
    {"model": "graduated", "tiers": []},
    {"model": "graduated", "tiers": [{"up_to": "10", "unit_price_minor": "1"}]},
    {"model": "volume", "tiers": [{"up_to": "10"}, {"up_to": "5"}, {}]},
    {"model": "volume", "tiers": [{}, {"up_to": "5"}]},
])
def test_inconsistent_price_models_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PriceModel.model_validate(bad)


def test_price_model_round_trips_as_strings() -> None:
    model = PriceModel(model="graduated", tiers=(PriceTier(up_to=D("1000"), unit_price_minor=D("0.4")),
                                                 PriceTier(unit_price_minor=D("0.25"))), free_units=D("50"))
    dumped = model.model_dump(mode="json")
    assert dumped["tiers"][0]["unit_price_minor"] == "0.4"
    assert PriceModel.model_validate_json(model.model_dump_json()) == model


# -- a new price version continues the period (DESIGN §2 invariant 9) ----------------------------------------

def test_a_new_price_version_continues_the_allowance_and_the_tiers() -> None:
    from ledger.pricing import continued_prices_minor

    free_1000 = PriceModel(model="per_unit", unit_price_minor=D(1), free_units=D(1000))
    # issue 13 item 4: 900 + 900 tokens with 1,000 free was 0 + 0; the second version continues at 900
    assert continued_prices_minor([(free_1000, "sum", D(900)), (free_1000, "sum", D(900))]) == [0, 800]
    dearer = PriceModel(model="per_unit", unit_price_minor=D(2), free_units=D(1000))
    assert continued_prices_minor([(free_1000, "sum", D(900)), (dearer, "sum", D(900))]) == [0, 1600]
    graduated = PriceModel(model="graduated", tiers=(PriceTier(up_to=D(100), unit_price_minor=D(10)),
                                                     PriceTier(unit_price_minor=D(1))))
    # the tier position carries over: 60 + 60 units → 60×10, then 40×10 + 20×1
    assert continued_prices_minor([(graduated, "sum", D(60)), (graduated, "sum", D(60))]) == [600, 420]
    # a single version is priced exactly as before
    assert continued_prices_minor([(graduated, "sum", D(120))]) == [price_minor(graduated, D(120))]
    # max: the later version prices only the peak above the earlier one
    assert continued_prices_minor([(graduated, "max", D(60)), (graduated, "max", D(50))]) == [600, 0]


@settings(max_examples=200, deadline=None)
@given(units=st.lists(st.integers(0, 3_000), min_size=1, max_size=5))
def test_continuing_with_the_same_price_is_the_price_of_the_total(units: list[int]) -> None:
    """A price version identical to the previous one changes nothing: the versions' charges add up to the price
    of the period's total, whatever the split."""
    from ledger.pricing import continued_prices_minor

    model = PriceModel(model="graduated", free_units=D(500),
                       tiers=(PriceTier(up_to=D(1000), unit_price_minor=D("0.4")), PriceTier(unit_price_minor=D(1))))
    charges = continued_prices_minor([(model, "sum", D(u)) for u in units])
    assert sum(charges) == price_minor(model, D(sum(units)))
