"""Pricing model v2: package rounding and free units, tiered packages (blocks per tier) and a
maximum spend per charge (docs/PRICING.md "Package options", "Tiered packages", "Maximum
spend"). Worked examples from the billing systems whose rules these are, then validation,
the catalog's rows and version, and telescoping."""

from __future__ import annotations

import copy
from decimal import Decimal as D
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.platform.errors import ConfigError
from billing.pricing.catalog import (
    CURRENCIES,
    MetricPrice,
    Plan,
    Tier,
    catalog_tables,
    catalog_version,
    cumulative_charges,
    daily_charges,
    invoice_total,
    parse_catalog,
    price,
    to_minor,
)


def package(size, unit_price, **options) -> MetricPrice:
    return MetricPrice(
        metric="m", mode="package", package_size=D(size), package_price=D(unit_price), **options
    )


def blocks(*tiers, **options) -> MetricPrice:
    """tiers: (up_to or None, block_size, block_price)."""
    return MetricPrice(
        metric="m",
        mode="tiered_package",
        tiers=tuple(
            Tier(None if u is None else D(u), D(0), block_size=D(s), block_price=D(p))
            for u, s, p in tiers
        ),
        **options,
    )


# ------------------------------------------------------------------ package rounding
@pytest.mark.parametrize(
    ("quantity", "up", "down"),
    [(0, 0, 0), (1, 1, 0), (999, 1, 0), (1000, 1, 1), (1001, 2, 1), (1500, 2, 1), (2000, 2, 2)],
)
def test_stripe_transform_quantity_round_up_and_down(quantity, up, down):
    # Stripe, "Per unit pricing with transform_quantity"
    # (https://docs.stripe.com/products-prices/pricing-models#transform-quantity): usage is
    # divided by transform_quantity[divide_by] and the result rounded up or down
    # (transform_quantity[round]) before the unit price applies. divide_by=1000 at $2.00:
    # 1,500 units are 2 packages rounded up ($4.00), 1 rounded down ($2.00).
    assert price(package(1000, "2.00"), D(quantity)) == 2 * up
    assert price(package(1000, "2.00", rounding="down"), D(quantity)) == 2 * down


def test_stripe_transform_quantity_minutes_billed_per_started_hour():
    # Stripe's car-rental illustration of transform_quantity: usage reported in minutes,
    # priced per hour with divide_by=60. Rounding up bills every started hour; rounding down
    # only the complete ones. 61 minutes at $15.00 an hour:
    assert price(package(60, "15.00"), D(61)) == D("30.00")
    assert price(package(60, "15.00", rounding="down"), D(61)) == D("15.00")
    assert price(package(60, "15.00", rounding="down"), D("59.999")) == 0


# ------------------------------------------------------------------ free units
@pytest.mark.parametrize(
    ("quantity", "dollars"), [(0, 0), (100, 0), (101, 5), (200, 5), (201, 10), (300, 10)]
)
def test_lago_package_with_free_units(quantity, dollars):
    # Lago, "Package" charge model (https://getlago.com/docs/guide/plans/charges/charge-models/package):
    # "charge $5 per 100 units and offer the first 100 units. In this example, 201 units
    # would cost $0 (first 100 units) + $5 (next 100 units) + $5 (last unit) = $10."
    mp = package(100, "5", free_units=D(100))
    assert price(mp, D(quantity)) == dollars
    assert to_minor(price(mp, D(201)), "usd") == 1000


def test_lago_package_free_units_then_round_up():
    # Lago's package rate model (getlago.com/docs/v2/guide/rate-cards/pricing-models/package):
    # "with 50 free calls, packages of 100 calls and a package price of 1 USD, 200 calls
    # leave 150 billable calls. Lago rounds these up to two packages, for a fee of 2 USD";
    # without free units, 2,000 calls fill exactly 20 packages: 20 USD.
    assert price(package(100, "1", free_units=D(50)), D(200)) == 2
    assert price(package(100, "1"), D(2000)) == 20
    # rounding down counts the complete packages of the billable quantity only
    assert price(package(100, "1", free_units=D(50), rounding="down"), D(200)) == 1


def test_free_units_may_be_fractional():
    mp = package("0.5", "0.10", free_units=D("2.25"))
    assert price(mp, D("2.25")) == 0
    assert price(mp, D("2.26")) == D("0.10")  # 0.01 billable: one started half unit
    assert price(mp, D("3.25")) == D("0.20")


# ------------------------------------------------------------------ tiered packages
def test_kill_bill_tiered_blocks():
    # Kill Bill's tiered blocks (https://docs.killbill.io/latest/userguide_subscription.html
    # #components-catalog-usage: a consumable usage section whose tiers each sell blocks of
    # a size at a price): $1.00 per block of 100 units up to 1,000 units, then $0.80 per
    # block of 100.
    mp = blocks((1000, 100, "1.00"), (None, 100, "0.80"))
    assert price(mp, D(0)) == 0
    assert price(mp, D(1)) == D("1.00")  # one started block
    assert price(mp, D(250)) == D("3.00")
    assert price(mp, D(1000)) == D("10.00")  # ten full blocks: the whole first tier
    assert price(mp, D(1001)) == D("10.80")  # the first unit of tier 2 starts a block there
    assert price(mp, D(1050)) == D("10.80")
    assert price(mp, D(1234)) == D("12.40")  # 10 x 1.00 + 3 x 0.80
    # rounding down: only complete blocks, in each tier
    down = blocks((1000, 100, "1.00"), (None, 100, "0.80"), rounding="down")
    assert [price(down, D(q)) for q in (99, 250, 1000, 1099, 1100)] == [
        0, 2, 10, D("10.00"), D("10.80"),
    ]  # fmt: skip


def test_kill_bill_all_tiers_example_with_blocks_of_one_unit():
    # Kill Bill's ALL_TIERS policy, as its invoice test computes it
    # (TestContiguousIntervalConsumableInArrear, killbill/killbill): tiers of 10, then 100
    # blocks of 1 unit at 1.5, 1 and 0.5: "111 = 10 (tier1) + 100 (tier2) + 1 (tier3) =>
    # 10 * 1.5 + 100 * 1 + 1 * 0.5 = 115.5".
    mp = blocks((10, 1, "1.5"), (110, 1, "1"), (None, 1, "0.5"))
    assert price(mp, D(111)) == D("115.5")


def test_a_block_never_straddles_a_tier_boundary():
    # The boundary rule (docs/PRICING.md "Tiered packages"): each tier counts its own units
    # in its own blocks from its lower bound, rounding applying per tier. A tier of 150
    # units in blocks of 100 holds one full block and a partial one.
    up = blocks((150, 100, "1.00"), (None, 100, "0.50"))
    assert price(up, D(150)) == 2  # the partial block at the top of tier 1 is charged in full
    assert price(up, D(151)) == D("2.50")  # tier 2's first block starts at unit 151
    assert price(up, D(250)) == D("2.50")
    assert price(up, D(251)) == 3
    down = blocks((150, 100, "1.00"), (None, 100, "0.50"), rounding="down")
    assert price(down, D(150)) == 1  # the 50 units above tier 1's full block are never charged
    assert price(down, D(249)) == 1
    assert price(down, D(250)) == D("1.50")


def test_tiered_package_free_units_apply_before_the_tiers():
    mp = blocks((1000, 100, "1.00"), (None, 100, "0.80"), free_units=D(500))
    assert price(mp, D(500)) == 0
    assert price(mp, D(501)) == 1  # billable unit 1: tier 1
    assert price(mp, D(1500)) == 10  # billable 1,000: exactly tier 1
    assert price(mp, D(1501)) == D("10.80")


# ------------------------------------------------------------------ maximum spend
def test_openmeter_maximum_amount_caps_the_charge():
    # OpenMeter's prices take maximumAmount: "The customer is limited to spend at most the
    # amount" (OpenMeter API, UnitPriceWithCommitments; openmeter.io/docs/billing/product-catalog/pricing-models).
    # Its per-unit example, $0.01 per token: 10,000 tokens cost $100; with a $50 maximum, $50.
    per_token = MetricPrice(metric="m", mode="graduated", tiers=(Tier(None, D("0.01")),))
    capped = MetricPrice(
        metric="m", mode="graduated", tiers=(Tier(None, D("0.01")),), max_spend=D("50")
    )
    assert price(per_token, D(10000)) == 100
    assert price(capped, D(10000)) == 50
    assert price(capped, D(4000)) == 40  # below the cap, the price as before
    assert price(capped, D(5000)) == 50


def test_maximum_spend_on_every_mode():
    cap = {"max_spend": D("12.00")}
    volume = MetricPrice(
        metric="m", mode="volume", tiers=(Tier(D(1000), D("0.02")), Tier(None, D("0.01"))), **cap
    )
    assert price(volume, D(1000)) == D("12.00")  # 20.00 capped
    assert price(volume, D(1001)) == D("10.01")  # a cheaper tier falls below the cap again
    assert price(package(100, "5", **cap), D(1000)) == 12
    assert price(blocks((None, 10, "1"), **cap), D(95)) == 10
    assert price(blocks((None, 10, "1"), **cap), D(500)) == 12
    free = package(100, "5", max_spend=D(0))
    assert price(free, D(10**6)) == 0


def test_capped_daily_charges_still_telescope():
    # The cap applies to the cumulative amount A(Q(d)), so C(d) is still a function of Q(d)
    # and the daily charges add up to the month's: the days after the cap is reached push 0.
    mp = package(100, "5", free_units=D(100), max_spend=D("12.50"))
    days = [D(150), D(100), D(60), D(500), D(1)]
    assert cumulative_charges(mp, "usd", days) == [500, 1000, 1250, 1250, 1250]
    assert daily_charges(mp, "usd", days) == [500, 500, 250, 0, 0]
    assert sum(daily_charges(mp, "usd", days)) == to_minor(price(mp, sum(days)), "usd")


def test_hand_built_tiered_package_needs_block_sizes():
    mp = MetricPrice(metric="m", mode="tiered_package", tiers=(Tier(None, D(1)),))
    with pytest.raises(ValueError, match="tiered_package needs positive block sizes"):
        price(mp, D(1))


# ------------------------------------------------------------------ the catalog
def doc() -> dict:
    return copy.deepcopy(
        {
            "metrics": {"api_calls": {"unit": "call"}, "storage_gb": {"unit": "GB"}},
            "plans": {
                "starter": {
                    "currency": "usd",
                    "base_fee": "29.00",
                    "metrics": {
                        "api_calls": {
                            "mode": "tiered_package",
                            "tiers": [
                                {"up_to": 1000, "block_size": 100, "block_price": "1.00"},
                                {"up_to": None, "block_size": 100, "block_price": "0.80"},
                            ],
                        },
                        "storage_gb": {
                            "mode": "package",
                            "package_size": 100,
                            "package_price": "5.00",
                        },
                    },
                }
            },
        }
    )


def test_catalog_reads_the_options_and_writes_their_rows():
    d = doc()
    d["plans"]["starter"]["metrics"]["storage_gb"].update(
        rounding="down", free_units="100.5", max_spend="20.00"
    )
    d["plans"]["starter"]["metrics"]["api_calls"].update(free_units=500, max_spend="9.99")
    catalog = parse_catalog(d)
    plan = catalog.plan("starter")
    storage, calls = plan.price_for("storage_gb"), plan.price_for("api_calls")
    assert (storage.rounding, storage.free_units, storage.max_spend) == ("down", D("100.5"), 20)
    assert (calls.rounding, calls.free_units, calls.max_spend) == ("up", 500, D("9.99"))
    assert calls.tiers[1] == Tier(None, D(0), block_size=D(100), block_price=D("0.80"))
    # 1,234 calls: 734 billable = 8 blocks, capped at 9.99; 350 GB: 249.5 billable = 2 packages
    assert invoice_total(plan, {"api_calls": D(1234), "storage_gb": D(350)}) == 2900 + 800 + 1000
    assert invoice_total(plan, {"api_calls": D(2000), "storage_gb": D(10**6)}) == 2900 + 999 + 2000
    tables = catalog_tables(catalog)
    pm = {row[1]: row[6:9] for row in tables["plan_metrics"]}  # rounding, free_units, max_spend
    assert pm == {
        "api_calls": ("up", D(500), D("9.99")),
        "storage_gb": ("down", D("100.5"), D("20.00")),
    }
    tiers = [row[-4:] for row in tables["plan_tiers"]]  # unit_price, block size, price, flat
    assert tiers == [(D(0), D(100), D("1.00"), D(0)), (D(0), D(100), D("0.80"), D(0))]


def test_catalog_version_changes_only_with_options_that_change_a_price():
    base = catalog_version(parse_catalog(doc()))
    d = doc()
    d["plans"]["starter"]["metrics"]["storage_gb"].update(rounding="up", free_units=0)
    assert catalog_version(parse_catalog(d)) == base  # the defaults, written out
    d["plans"]["starter"]["metrics"]["storage_gb"]["free_units"] = "0.000"
    assert catalog_version(parse_catalog(d)) == base
    versions = {base}
    for key, value in [("rounding", "down"), ("free_units", 1), ("max_spend", "0")]:
        d = doc()
        d["plans"]["starter"]["metrics"]["storage_gb"][key] = value
        versions.add(catalog_version(parse_catalog(d)))
    d = doc()
    d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][1]["block_size"] = 50
    versions.add(catalog_version(parse_catalog(d)))
    d = doc()
    d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][1]["block_price"] = "0.81"
    versions.add(catalog_version(parse_catalog(d)))
    assert len(versions) == 6


def test_a_catalog_without_the_options_keeps_its_version():
    # versions computed by the code before pricing model v2: a catalog that uses none of
    # its options (graduated + package) hashes as it did, and so does the shipped catalog
    old = {
        "metrics": {"api_calls": {"unit": "call"}, "storage_gb": {"unit": "GB"}},
        "plans": {
            "starter": {
                "currency": "usd",
                "base_fee": "29.00",
                "metrics": {
                    "api_calls": {
                        "mode": "graduated",
                        "tiers": [
                            {"up_to": 10, "unit_price": "0"},
                            {"up_to": None, "unit_price": "1"},
                        ],
                    },
                    "storage_gb": {"mode": "package", "package_size": 100, "package_price": "1.50"},
                },
            }
        },
    }
    before = "55dcec47689b191e2283e377ffce797a8d3dbabb5aa53a21681d64d91125583d"
    assert catalog_version(parse_catalog(old)) == before
    old["plans"]["starter"]["metrics"]["storage_gb"].update(rounding="up", free_units="0")
    assert catalog_version(parse_catalog(old)) == before
    # the shipped catalog: writing the defaults out on its package metrics changes nothing
    shipped = Path(__file__).resolve().parents[3] / "include" / "config" / "catalog.yaml"
    d = yaml.safe_load(shipped.read_text())
    for plan in d["plans"].values():
        for spec in (plan.get("metrics") or {}).values():
            if spec.get("mode") == "package":
                spec.update(rounding="up", free_units=0)
    assert catalog_version(parse_catalog(d)) == catalog_version(shipped)


P = "catalog: plan 'starter' metric"


def _edit(path: tuple, value):
    def apply(d: dict) -> dict:
        target = d["plans"]["starter"]["metrics"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return d

    return apply


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _edit(("storage_gb", "rounding"), "nearest"),
            f"{P} 'storage_gb' rounding: unknown rounding 'nearest' (expected one of: up, down)",
        ),
        (
            _edit(("storage_gb", "rounding"), True),
            f"{P} 'storage_gb' rounding: unknown rounding True (expected one of: up, down)",
        ),
        (
            _edit(("storage_gb", "free_units"), -5),
            f"{P} 'storage_gb' free_units: must not be negative, got -5",
        ),
        (
            _edit(("storage_gb", "free_units"), "-5"),
            f"{P} 'storage_gb' free_units: must not be negative, got '-5'",
        ),
        (
            _edit(("storage_gb", "free_units"), 1.5),
            f"{P} 'storage_gb' free_units: must be an integer or a quoted decimal string, got"
            ' YAML float 1.5 (write it quoted: "1.5")',
        ),
        (
            _edit(("storage_gb", "max_spend"), 100),
            f"{P} 'storage_gb' max_spend: money must be a quoted decimal string, got YAML"
            ' integer 100 (write it quoted: "100")',
        ),
        (
            _edit(("storage_gb", "max_spend"), "-1"),
            f"{P} 'storage_gb' max_spend: must not be negative, got '-1'",
        ),
        (
            _edit(("storage_gb", "max_spend"), "10.005"),
            f"{P} 'storage_gb' max_spend: '10.005' has more decimal places than usd allows (2)",
        ),
        (
            _edit(("api_calls", "max_spend"), None),
            f"{P} 'api_calls' max_spend: money must be a quoted decimal string, got null",
        ),
        (
            _edit(("api_calls", "tiers", 0, "block_size"), 0),
            f"{P} 'api_calls' tiers[0].block_size: must be positive, got 0",
        ),
        (
            _edit(("api_calls", "tiers", 0, "block_size"), "0.0"),
            f"{P} 'api_calls' tiers[0].block_size: must be positive, got 0.0",
        ),
        (
            _edit(("api_calls", "tiers", 1, "block_price"), 0.8),
            f"{P} 'api_calls' tiers[1].block_price: money must be a quoted decimal string, got"
            ' YAML float 0.8 (write it quoted: "0.8")',
        ),
        (
            _edit(
                ("api_calls", "tiers"),
                [
                    {"up_to": 1000, "block_size": 100, "block_price": "1"},
                    {"up_to": 1000, "block_size": 100, "block_price": "1"},
                    {"up_to": None, "block_size": 100, "block_price": "1"},
                ],
            ),
            f"{P} 'api_calls' tiers[1].up_to: tiers must be strictly increasing (1000 after 1000)",
        ),
        (
            _edit(("api_calls", "tiers", 1, "up_to"), 2000),
            f"{P} 'api_calls' tiers[1].up_to: the last tier must be open (up_to: null) so"
            " every quantity is priced",
        ),
        (
            _edit(("api_calls", "tiers", 0, "unit_price"), "1"),
            f"{P} 'api_calls' tiers[0].unit_price: unknown key (allowed: block_price,"
            " block_size, up_to)",
        ),
        (
            _edit(("api_calls", "tiers", 0), {"up_to": 1000, "block_size": 100}),
            f"{P} 'api_calls' tiers[0].block_price: missing",
        ),
        (
            _edit(("storage_gb", "tiers"), []),
            f"{P} 'storage_gb' tiers: unknown key (allowed: free_units, max_spend, min_spend, mode,"
            " package_price, package_size, rounding)",
        ),
        (
            _edit(("api_calls", "package_size"), 100),
            f"{P} 'api_calls' package_size: unknown key (allowed: free_units, max_spend, min_spend, mode,"
            " rounding, tiers)",
        ),
        (
            _edit(("api_calls", "mode"), "tiered"),
            f"{P} 'api_calls' mode: unknown mode 'tiered' (expected one of: graduated, volume,"
            " package, tiered_package)",
        ),
    ],
)
def test_invalid_options_are_rejected(edit, message):
    with pytest.raises(ConfigError) as err:
        parse_catalog(edit(doc()))
    assert str(err.value) == message


def _graduated(d: dict, **options) -> dict:
    d["plans"]["starter"]["metrics"]["api_calls"] = {
        "mode": "graduated",
        "tiers": [
            {"up_to": 1000, "unit_price": "0", "block_size": 10}
            if options.pop("block", False)
            else {"up_to": 1000, "unit_price": "0"},
            {"up_to": None, "unit_price": "0.001"},
        ],
        **options,
    }
    return d


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"rounding": "down"},
            f"{P} 'api_calls' rounding: only package and tiered_package metrics take it (this"
            " one is graduated)",
        ),
        (
            {"free_units": 10},
            f"{P} 'api_calls' free_units: only package and tiered_package metrics take it"
            " (this one is graduated)",
        ),
        (
            {"block": True},
            f"{P} 'api_calls' tiers[0].block_size: unknown key (allowed: flat_amount,"
            " unit_price, up_to)",
        ),
    ],
)
def test_package_options_are_for_the_package_modes_only(options, message):
    with pytest.raises(ConfigError) as err:
        parse_catalog(_graduated(doc(), **options))
    assert str(err.value) == message
    # a maximum spend is for every mode
    capped = parse_catalog(_graduated(doc(), max_spend="7.00"))
    assert price(capped.plan("starter").price_for("api_calls"), D(10**6)) == 7


def test_overflow_check_covers_tiered_packages_and_a_cap_bounds_it():
    d = doc()
    d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][1].update(
        block_size="0.000001", block_price="1000"
    )
    with pytest.raises(ConfigError) as err:
        parse_catalog(d)
    assert str(err.value).startswith(
        f"{P} 'api_calls' tiers[1].block_price: 1000000000000 units in a month would cost"
        " 99999999900000000001000 minor units, above the limit of 100000000000000000"
    )
    # the maximum spend bounds what the month can cost: the same price is then safe
    d["plans"]["starter"]["metrics"]["api_calls"]["max_spend"] = "1000000.00"
    catalog = parse_catalog(d)
    assert price(catalog.plan("starter").price_for("api_calls"), D(10**12)) == 10**6
    # a tier that adds the most is named whichever it is
    d = doc()
    d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][0].update(block_size="0.0000001")
    d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][0]["up_to"] = 10**12
    d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][0]["block_price"] = "10"
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.block_price: 1000000000000 units"):
        parse_catalog(d)


# ------------------------------------------------------------------ properties
quantities = st.decimals(min_value=0, max_value=20000, places=3)


@st.composite
def priced(draw) -> MetricPrice:
    """A package or tiered_package price with random options, or any mode with a cap."""
    rounding = draw(st.sampled_from(["up", "down"]))
    free = draw(st.sampled_from([D(0), D(0), D(1), D("12.5"), D(900)]))
    cap = draw(st.sampled_from([None, None, D(0), D("3.00"), D("47.25")]))
    size = st.decimals(min_value="0.25", max_value=500, places=2)
    unit = st.decimals(min_value=0, max_value=5, places=4)
    if draw(st.booleans()):
        return package(draw(size), draw(unit), rounding=rounding, free_units=free, max_spend=cap)
    bounds = sorted(draw(st.sets(st.decimals(min_value=1, max_value=9000, places=1), max_size=3)))
    return blocks(
        *[(b, draw(size), draw(unit)) for b in [*bounds, None]],
        rounding=rounding,
        free_units=free,
        max_spend=cap,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mp=priced(),
    currency=st.sampled_from(sorted(CURRENCIES)),
    days=st.lists(quantities, max_size=31),
)
def test_daily_charges_telescope_to_the_monthly_charge(mp, currency, days):
    daily = daily_charges(mp, currency, days)
    cumulative = cumulative_charges(mp, currency, days)
    total = sum(days, D(0))
    monthly = to_minor(price(mp, total), currency)
    assert sum(daily) == (cumulative[-1] if days else 0)
    if days:
        assert cumulative[-1] == monthly
    plan = Plan(name="p", currency=currency, base_fee=D(0), metrics={"m": mp})
    assert invoice_total(plan, {"m": total}) == monthly
    # package prices never decrease with the quantity, and the cap is never passed
    assert all(x >= 0 for x in daily)
    if mp.max_spend is not None:
        assert price(mp, total) <= mp.max_spend


@settings(max_examples=200, deadline=None)
@given(mp=priced(), a=quantities, b=quantities)
def test_rounding_down_never_charges_more_than_up(mp, a, b):
    lo, hi = sorted((a, b))
    assert price(mp, lo) <= price(mp, hi)
    up = MetricPrice(**{**mp.__dict__, "rounding": "up"})
    down = MetricPrice(**{**mp.__dict__, "rounding": "down"})
    assert price(down, hi) <= price(up, hi)


# ------------------------------------------------------------------ the invoice breakdown
def test_pdf_rows_for_tiered_packages_options_and_the_cap():
    # fct_invoice_lines' json for a tiered_package line capped by its maximum spend, and for
    # a package line with free units rounding down; the PDF reads it through store._tiers
    from billing.invoices.store import _tiers

    tiered = [
        {"tier": 1, "from": 0, "up_to": 1000, "quantity": 1000, "packages": 10,
         "package_size": 100, "package_price": "1.00", "amount": "10.00"},
        {"tier": 2, "from": 1000, "up_to": None, "quantity": 234, "packages": 3,
         "package_size": 100, "package_price": "0.80", "amount": "2.40"},
        {"max_spend": "12.00", "amount": "-0.40"},
    ]  # fmt: skip
    rows = _tiers(tiered)
    assert [r.label for r in rows] == [
        "1 – 1,000 in packages of 100",
        "1,001 – ∞ in packages of 100",
        "capped at the maximum spend of 12.00",
    ]
    assert sum(r.amount for r in rows) == D("12.00")  # the rows add up to the line
    [row] = _tiers(
        [{"packages": 1, "package_size": 100, "package_price": "5", "amount": "5",
          "free_units": 100, "rounding": "down"}]
    )  # fmt: skip
    assert row.label == "packages of 100 after 100 free (complete packages only)"
    assert (row.quantity, row.unit_price, row.amount) == (1, 5, 5)
