"""The pricing catalog and the exact money rules (pure Python, no stack needed)."""

from __future__ import annotations

import copy
import re
from decimal import Decimal as D
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.platform.errors import BillingError, ConfigError
from billing.pricing.catalog import (
    CURRENCIES,
    Catalog,
    MetricPrice,
    Plan,
    Tier,
    catalog_tables,
    catalog_version,
    cumulative_charges,
    daily_charges,
    format_money,
    invoice_total,
    load_catalog,
    minor_exponent,
    parse_catalog,
    price,
    to_minor,
)

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "include" / "config" / "catalog.yaml"

GRAD = MetricPrice(
    metric="api_calls",
    mode="graduated",
    tiers=(
        Tier(D(100000), D("0")),
        Tier(D(1000000), D("0.0002")),
        Tier(None, D("0.0001")),
    ),
)
VOL = MetricPrice(
    metric="api_calls",
    mode="volume",
    tiers=(
        Tier(D(1000), D("0.01")),
        Tier(D(10000), D("0.005")),
        Tier(None, D("0.002")),
    ),
)
PKG = MetricPrice(metric="storage_gb", mode="package", package_size=D(100), package_price=D("1.50"))


def base_catalog() -> dict:
    """A small valid catalog document (fresh copy each call)."""
    return copy.deepcopy(
        {
            "metrics": {
                "api_calls": {"unit": "call", "description": "API requests"},
                "storage_gb": {"unit": "GB"},
            },
            "plans": {
                "starter": {
                    "currency": "usd",
                    "base_fee": "29.00",
                    "metrics": {
                        "api_calls": {
                            "mode": "graduated",
                            "tiers": [
                                {"up_to": 100000, "unit_price": "0"},
                                {"up_to": 1000000, "unit_price": "0.0002"},
                                {"up_to": None, "unit_price": "0.0001"},
                            ],
                        },
                        "storage_gb": {
                            "mode": "package",
                            "package_size": 100,
                            "package_price": "1.50",
                        },
                    },
                }
            },
        }
    )


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("quantity", "exact", "cents"),
    [
        ("0", "0", 0),
        ("100000", "0", 0),  # exactly on up_to: still in the free tier
        ("100001", "0.0002", 0),  # one unit into tier 2
        ("100025", "0.0050", 1),  # 0.5 cent rounds half up
        ("100024", "0.0048", 0),
        ("100000.5", "0.00010", 0),  # fractional quantity straddling the boundary
        ("150000", "10.0000", 1000),
        ("1000000", "180.0000", 18000),  # exactly on the second boundary
        ("1000001", "180.0001", 18000),
        ("1234567", "203.4567", 20346),
        ("1000000.25", "180.000025", 18000),
    ],
)
def test_graduated(quantity, exact, cents):
    amount = price(GRAD, D(quantity))
    assert amount == D(exact)
    assert to_minor(amount, "usd") == cents


@pytest.mark.parametrize(
    ("quantity", "exact", "cents"),
    [
        ("0", "0", 0),
        ("1", "0.01", 1),
        ("1000", "10.00", 1000),  # on up_to: the first tier's price for all units
        ("1001", "5.005", 501),  # all 1001 units at 0.005; 500.5 cents -> 501
        ("1000.5", "5.0025", 500),
        ("10000", "50.000", 5000),
        ("10001", "20.002", 2000),
        ("12345.6", "24.6912", 2469),
    ],
)
def test_volume(quantity, exact, cents):
    amount = price(VOL, D(quantity))
    assert amount == D(exact)
    assert to_minor(amount, "usd") == cents


@pytest.mark.parametrize(
    ("quantity", "cents"),
    [
        ("0", 0),
        ("0.001", 150),  # any started package is charged
        ("1", 150),
        ("100", 150),  # exactly one package
        ("100.0001", 300),
        ("101", 300),
        ("200", 300),
        ("250.5", 450),
    ],
)
def test_package(quantity, cents):
    amount = price(PKG, D(quantity))
    assert to_minor(amount, "usd") == cents


def test_package_fractional_size():
    mp = MetricPrice(metric="m", mode="package", package_size=D("0.5"), package_price=D("0.10"))
    assert price(mp, D("1.2")) == D("0.30")
    assert price(mp, D("1.5")) == D("0.30")


def test_unpriced_metric_costs_nothing():
    catalog = load_catalog(SHIPPED)
    starter = catalog.plan("starter")
    assert starter.price_for("emails_sent") is None
    assert starter.price_for("no_such_metric") is None
    assert price(None, D(10**9)) == 0
    assert cumulative_charges(None, "usd", [D(5), D(7)]) == [0, 0]
    assert invoice_total(starter, {"emails_sent": D(10**6)}) == 2900


def test_price_rejects_floats_and_negative_quantities():
    with pytest.raises(TypeError):
        price(GRAD, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        price(GRAD, D(-1))
    with pytest.raises(ValueError):
        price(GRAD, D("NaN"))
    with pytest.raises(ValueError):
        cumulative_charges(GRAD, "usd", [D(5), D(-1)])
    with pytest.raises(TypeError):
        to_minor(0.005, "usd")  # type: ignore[arg-type]


def test_price_accepts_plain_ints():
    assert price(GRAD, 100025) == D("0.005")


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("0.005", "usd", 1),  # half a cent rounds up
        ("0.0049999", "usd", 0),
        ("0.015", "usd", 2),  # half up, not half even
        ("0.025", "eur", 3),
        ("1.994999", "gbp", 199),
        ("1234.5", "usd", 123450),
        ("0.5", "jpy", 1),  # exponent 0: whole yen
        ("0.4999", "jpy", 0),
        ("1200", "jpy", 1200),
        ("2.5", "krw", 3),
        ("-0.005", "usd", -1),  # half away from zero for credits
    ],
)
def test_to_minor_rounds_half_up(amount, currency, minor):
    assert to_minor(D(amount), currency) == minor


def test_minor_exponents():
    assert {c: minor_exponent(c) for c in CURRENCIES} == {
        "usd": 2,
        "eur": 2,
        "gbp": 2,
        "cad": 2,
        "aud": 2,
        "chf": 2,
        "jpy": 0,
        "krw": 0,
    }
    assert minor_exponent("USD") == 2
    with pytest.raises(ConfigError, match="unsupported currency 'xyz'"):
        minor_exponent("xyz")
    with pytest.raises(ConfigError):
        to_minor(D(1), "btc")


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (123450, "usd", "$1,234.50"),
        (1200, "jpy", "¥1,200"),
        (1200, "eur", "€12.00"),
        (5, "gbp", "£0.05"),
        (0, "usd", "$0.00"),
        (100000000, "cad", "CA$1,000,000.00"),
        (199, "aud", "A$1.99"),
        (1050, "chf", "CHF 10.50"),
        (1234567, "krw", "₩1,234,567"),
        (-250, "usd", "-$2.50"),
    ],
)
def test_format_money(minor, currency, text):
    assert format_money(minor, currency) == text


def test_rounding_happens_on_the_cumulative_amount():
    # 33 calls a day at EUR 0.00015 = 0.495 cent/day: rounding each day would bill 0;
    # the cumulative rule bills 0 + 1 + 0 (1.485 cents -> 1) = 1 cent, the month's rounded total.
    mp = MetricPrice(metric="api_calls", mode="graduated", tiers=(Tier(None, D("0.00015")),))
    days = [D(33)] * 3
    assert cumulative_charges(mp, "eur", days) == [0, 1, 1]
    assert daily_charges(mp, "eur", days) == [0, 1, 0]


def test_volume_daily_charge_can_be_negative():
    # Day 1: 900 units at 0.01 = $9.00. Day 2: total 1,100 -> all at 0.005 = $5.50.
    days = [D(900), D(200), D(10)]
    assert cumulative_charges(VOL, "usd", days) == [900, 550, 555]
    assert daily_charges(VOL, "usd", days) == [900, -350, 5]


def test_graduated_daily_charges_example():
    days = [D(60000), D(60000), D(1000000), D("0.5")]
    assert cumulative_charges(GRAD, "usd", days) == [0, 400, 19200, 19200]
    assert daily_charges(GRAD, "usd", days) == [0, 400, 18800, 0]
    assert daily_charges(GRAD, "usd", []) == []


def test_invoice_total():
    catalog = parse_catalog(base_catalog())
    plan = catalog.plan("starter")
    assert plan.base_fee_minor == 2900
    # 2900 base + 20346 (1,234,567 calls) + 450 (3 packages of storage)
    assert invoice_total(plan, {"api_calls": D(1234567), "storage_gb": D("250.5")}) == 23696
    assert invoice_total(plan, {}) == 2900


def test_invoice_total_jpy():
    tokyo = load_catalog(SHIPPED).plan("tokyo")
    assert tokyo.currency == "jpy"
    # 3000 + (123,457 - 100,000) * 0.03 = 3000 + 703.71 -> 3704 yen
    assert invoice_total(tokyo, {"api_calls": D(123457)}) == 3704
    assert format_money(3704, tokyo.currency) == "¥3,704"


# --------------------------------------------------------------------------- telescoping

amounts = st.decimals(min_value=0, max_value=10000, places=4, allow_nan=False, allow_infinity=False)
quantities = st.decimals(
    min_value=0, max_value=50000, places=3, allow_nan=False, allow_infinity=False
)


@st.composite
def metric_prices(draw) -> MetricPrice:
    mode = draw(st.sampled_from(["graduated", "volume", "package"]))
    if mode == "package":
        size = draw(st.decimals(min_value="0.5", max_value=5000, places=2))
        return MetricPrice(
            metric="m",
            mode=mode,
            package_size=size,
            package_price=draw(st.decimals(min_value=0, max_value=100, places=5)),
        )
    bounds = sorted(
        draw(
            st.sets(
                st.decimals(min_value="0.01", max_value=60000, places=2),
                max_size=4,
            )
        )
    )
    prices = st.decimals(min_value=0, max_value="0.5", places=6)
    flats = st.sampled_from([D(0), D(0), D("0.005"), D("2.50"), D(40)])
    tiers = [Tier(b, draw(prices), draw(flats)) for b in bounds]
    tiers.append(Tier(None, draw(prices), draw(flats)))
    return MetricPrice(metric="m", mode=mode, tiers=tuple(tiers))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mp=metric_prices(),
    currency=st.sampled_from(sorted(CURRENCIES)),
    days=st.lists(quantities, max_size=31),
)
def test_daily_charges_telescope(mp, currency, days):
    daily = daily_charges(mp, currency, days)
    cumulative = cumulative_charges(mp, currency, days)
    assert len(daily) == len(cumulative) == len(days)
    assert all(isinstance(x, int) for x in daily + cumulative)
    total = sum(days, D(0))
    expected = to_minor(price(mp, total), currency)
    assert sum(daily) == (cumulative[-1] if cumulative else 0)
    if days:
        assert cumulative[-1] == expected
    plan = Plan(name="p", currency=currency, base_fee=D(0), metrics={"m": mp})
    assert invoice_total(plan, {"m": total}) == expected
    if mp.mode != "volume":
        # graduated and package prices never decrease with quantity
        assert all(x >= 0 for x in daily)


@settings(max_examples=200, deadline=None)
@given(mp=metric_prices(), a=quantities, b=quantities)
def test_graduated_and_package_are_monotonic(mp, a, b):
    if mp.mode != "volume":
        lo, hi = sorted((a, b))
        assert price(mp, lo) <= price(mp, hi)


@settings(max_examples=200, deadline=None)
@given(tiers=st.data(), q=quantities)
def test_graduated_matches_unit_by_unit_for_integers(tiers, q):
    # For integer quantities, graduated == sum over units n=1..q of the price of unit n's tier
    # (a unit numbered exactly up_to belongs to that tier).
    q = int(q) % 300
    bounds = sorted(tiers.draw(st.sets(st.integers(1, 300), max_size=3)))
    prices = [
        tiers.draw(st.sampled_from(["0", "0.01", "0.003", "1.5"])) for _ in range(len(bounds) + 1)
    ]
    mp = MetricPrice(
        metric="m",
        mode="graduated",
        tiers=tuple(Tier(D(b), D(p)) for b, p in zip(bounds, prices, strict=False))
        + (Tier(None, D(prices[-1])),),
    )

    def unit_price(n: int) -> D:
        for t in mp.tiers:
            if t.up_to is None or n <= t.up_to:
                return t.unit_price
        raise AssertionError

    assert price(mp, D(q)) == sum((unit_price(n) for n in range(1, q + 1)), D(0))


# --------------------------------------------------------------------------- catalog


def test_shipped_catalog_loads():
    catalog = load_catalog(SHIPPED)
    assert set(catalog.metrics) == {
        "api_calls",
        "storage_gb",
        "compute_minutes",
        "emails_sent",
        "ai_tokens",
        "active_users",
    }
    assert catalog.metrics["ai_tokens"].dimensions == ("model", "token_type")
    assert catalog.metrics["active_users"].aggregation == "unique_count"
    growth = catalog.plan("growth")
    assert growth.price_for("ai_tokens", '["large", "output"]').tiers[0].unit_price == D("0.000015")
    assert growth.price_for("ai_tokens", '["small", "input"]') == growth.price_for("ai_tokens")
    assert growth.price_for("active_users").tiers[0].flat_amount == D("20.00")
    assert set(catalog.plans) == {"starter", "growth", "enterprise", "tokyo"}
    starter = catalog.plan("starter")
    assert (starter.currency, starter.base_fee) == ("usd", D("29.00"))
    assert starter.price_for("api_calls") == GRAD
    assert starter.price_for("storage_gb") == PKG
    assert catalog.plan("growth").price_for("api_calls").mode == "volume"
    assert catalog.plan("enterprise").currency == "eur"
    assert all(mp.mode == "graduated" for mp in catalog.plan("enterprise").metrics.values())
    assert catalog.plan("tokyo").base_fee_minor == 3000


def test_default_path_and_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("BILLING_CATALOG", raising=False)
    assert catalog_version(load_catalog()) == catalog_version(SHIPPED)
    alt = tmp_path / "alt.yaml"
    alt.write_text(yaml.safe_dump(base_catalog()))
    monkeypatch.setenv("BILLING_CATALOG", str(alt))
    assert set(load_catalog().plans) == {"starter"}


def test_unknown_plan():
    catalog = load_catalog(SHIPPED)
    with pytest.raises(ConfigError, match="unknown plan 'gold'"):
        catalog.plan("gold")


def test_catalog_is_immutable():
    catalog = load_catalog(SHIPPED)
    assert isinstance(catalog, Catalog)
    with pytest.raises(TypeError):
        catalog.plans["x"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        catalog.plan("starter").metrics["x"] = None  # type: ignore[index]


def _set(doc: dict, path: tuple, value) -> dict:
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()
API = ("plans", "starter", "metrics", "api_calls")
STORAGE = ("plans", "starter", "metrics", "storage_gb")
TIERS = (*API, "tiers")

INVALID = [
    # (id, path, new value, fragments that must appear in the message)
    (
        "unsorted",
        (*TIERS, 1, "up_to"),
        50000,
        ["plan 'starter' metric 'api_calls' tiers[1].up_to", "strictly increasing"],
    ),
    (
        "duplicate",
        (*TIERS, 1, "up_to"),
        100000,
        ["plan 'starter' metric 'api_calls' tiers[1].up_to", "strictly increasing"],
    ),
    (
        "closed-last",
        (*TIERS, 2, "up_to"),
        5000000,
        ["plan 'starter' metric 'api_calls' tiers[2].up_to", "last tier must be open"],
    ),
    (
        "open-middle",
        (*TIERS, 0, "up_to"),
        None,
        ["plan 'starter' metric 'api_calls' tiers[0].up_to", "only the last tier may be open"],
    ),
    (
        "zero-first-bound",
        (*TIERS, 0, "up_to"),
        0,
        ["plan 'starter' metric 'api_calls' tiers[0].up_to", "must be positive"],
    ),
    (
        "float-up_to",
        (*TIERS, 0, "up_to"),
        1.5,
        ["plan 'starter' metric 'api_calls' tiers[0].up_to", "quoted decimal string"],
    ),
    (
        "missing-up_to",
        (*TIERS, 0, "up_to"),
        _DELETE,
        ["plan 'starter' metric 'api_calls' tiers[0].up_to", "missing"],
    ),
    (
        "empty-tiers",
        (*TIERS,),
        [],
        ["plan 'starter' metric 'api_calls' tiers", "non-empty list"],
    ),
    (
        "undeclared-metric",
        ("plans", "starter", "metrics", "bandwidth_gb"),
        {"mode": "package", "package_size": 1, "package_price": "1"},
        ["plan 'starter' metric 'bandwidth_gb'", "not declared"],
    ),
    (
        "non-numeric-price",
        (*TIERS, 1, "unit_price"),
        "two cents",
        ["plan 'starter' metric 'api_calls' tiers[1].unit_price", "not a decimal number"],
    ),
    (
        "unquoted-flat-amount",
        (*TIERS, 1, "flat_amount"),
        10,
        ["plan 'starter' metric 'api_calls' tiers[1].flat_amount", 'quoted: "10"'],
    ),
    (
        "negative-flat-amount",
        (*TIERS, 0, "flat_amount"),
        "-5",
        ["plan 'starter' metric 'api_calls' tiers[0].flat_amount", "negative"],
    ),
    (
        "flat-amount-above-the-limit",
        (*TIERS, 2, "flat_amount"),
        "2000000000000000",
        ["plan 'starter' metric 'api_calls' tiers[2].flat_amount", "above the limit"],
    ),
    (
        "nan-price",
        (*TIERS, 1, "unit_price"),
        "NaN",
        ["plan 'starter' metric 'api_calls' tiers[1].unit_price", "finite"],
    ),
    (
        "infinite-price",
        (*TIERS, 2, "unit_price"),
        "Infinity",
        ["plan 'starter' metric 'api_calls' tiers[2].unit_price", "finite"],
    ),
    (
        "negative-price",
        (*TIERS, 1, "unit_price"),
        "-0.0002",
        ["plan 'starter' metric 'api_calls' tiers[1].unit_price", "negative"],
    ),
    (
        "float-price",
        (*TIERS, 1, "unit_price"),
        0.0002,
        [
            "plan 'starter' metric 'api_calls' tiers[1].unit_price",
            "money must be a quoted decimal string",
            "YAML float",
        ],
    ),
    (
        "int-price",
        (*TIERS, 0, "unit_price"),
        0,
        ["plan 'starter' metric 'api_calls' tiers[0].unit_price", "quoted decimal string"],
    ),
    (
        "exponent-price",
        (*TIERS, 1, "unit_price"),
        "2e-4",
        ["plan 'starter' metric 'api_calls' tiers[1].unit_price", "plain decimal"],
    ),
    (
        "float-base-fee",
        ("plans", "starter", "base_fee"),
        29.0,
        ["plan 'starter' base_fee", "quoted decimal string"],
    ),
    (
        "negative-base-fee",
        ("plans", "starter", "base_fee"),
        "-1.00",
        ["plan 'starter' base_fee", "negative"],
    ),
    (
        "sub-cent-base-fee",
        ("plans", "starter", "base_fee"),
        "29.005",
        ["plan 'starter' base_fee", "more decimal places than usd allows"],
    ),
    (
        "missing-base-fee",
        ("plans", "starter", "base_fee"),
        _DELETE,
        ["plan 'starter' base_fee", "missing"],
    ),
    (
        "unknown-mode",
        (*API, "mode"),
        "tiered",
        ["plan 'starter' metric 'api_calls' mode", "unknown mode 'tiered'"],
    ),
    (
        "zero-package-size",
        (*STORAGE, "package_size"),
        0,
        ["plan 'starter' metric 'storage_gb' package_size", "must be positive"],
    ),
    (
        "negative-package-size",
        (*STORAGE, "package_size"),
        -100,
        ["plan 'starter' metric 'storage_gb' package_size", "negative"],
    ),
    (
        "float-package-price",
        (*STORAGE, "package_price"),
        1.5,
        ["plan 'starter' metric 'storage_gb' package_price", "quoted decimal string"],
    ),
    (
        "tiers-in-package-mode",
        (*STORAGE, "tiers"),
        [{"up_to": None, "unit_price": "1"}],
        ["plan 'starter' metric 'storage_gb' tiers", "unknown key"],
    ),
    (
        "unknown-currency",
        ("plans", "starter", "currency"),
        "btc",
        ["plan 'starter' currency", "unsupported currency 'btc'"],
    ),
    (
        "missing-currency",
        ("plans", "starter", "currency"),
        _DELETE,
        ["plan 'starter' currency", "missing"],
    ),
    (
        "typo-key",
        ("plans", "starter", "base_fees"),
        "1.00",
        ["plan 'starter' base_fees", "unknown key"],
    ),
    (
        "metric-without-unit",
        ("metrics", "storage_gb", "unit"),
        _DELETE,
        ["metric 'storage_gb' unit", "missing"],
    ),
    (
        "bad-plan-name",
        ("plans", "Starter Plan"),
        {"currency": "usd", "base_fee": "1"},
        ["plan 'Starter Plan'", "name must match"],
    ),
    ("no-plans", ("plans",), {}, ["plans", "non-empty mapping"]),
    ("no-metrics", ("metrics",), _DELETE, ["metrics", "missing"]),
]


@pytest.mark.parametrize(
    ("path", "value", "fragments"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_catalog_is_rejected(path, value, fragments):
    doc = _set(base_catalog(), path, value)
    with pytest.raises(ConfigError) as info:
        parse_catalog(doc)
    message = str(info.value)
    assert message.startswith("catalog: ")
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, BillingError)


def test_example_error_message_from_the_contract():
    doc = _set(base_catalog(), (*TIERS, 1, "up_to"), 100)
    with pytest.raises(ConfigError) as info:
        parse_catalog(doc)
    assert str(info.value).startswith(
        "catalog: plan 'starter' metric 'api_calls' tiers[1].up_to: tiers must be strictly increasing"
    )


def test_base_catalog_is_valid_and_jpy_base_fee_must_be_whole():
    parse_catalog(base_catalog())
    doc = base_catalog()
    doc["plans"]["starter"].update(currency="jpy", base_fee="3000.00")
    assert parse_catalog(doc).plan("starter").base_fee_minor == 3000
    doc["plans"]["starter"]["base_fee"] = "3000.5"
    with pytest.raises(ConfigError, match="plan 'starter' base_fee: .* jpy allows"):
        parse_catalog(doc)


@pytest.mark.parametrize("doc", [None, [], "plans: 1"])
def test_top_level_must_be_a_mapping(doc):
    with pytest.raises(ConfigError, match="catalog: top level: must be a mapping"):
        parse_catalog(doc)


def test_unknown_top_level_key():
    doc = base_catalog()
    doc["currencies"] = ["usd"]
    with pytest.raises(ConfigError, match="catalog: currencies: unknown key"):
        parse_catalog(doc)


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_catalog(missing)
    assert str(missing) in str(info.value)


def test_load_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans: [unclosed\n  starter: {\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_catalog(bad)
    assert str(bad) in str(info.value)


def test_load_unquoted_money_in_yaml(tmp_path):
    text = SHIPPED.read_text().replace('base_fee: "29.00"', "base_fee: 29.00")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError,
        match=r"plan 'starter' base_fee: money must be a quoted decimal string, got YAML float 29\.0",
    ):
        load_catalog(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="top level: must be a mapping"):
        load_catalog(path)


# --------------------------------------------------------------------------- export


def test_catalog_tables():
    tables = catalog_tables(parse_catalog(base_catalog()))
    # ..., minimum_commitment_cents (docs/PRICING.md "Minimum spend and commitment")
    assert tables["plans"] == [("starter", "usd", D("29.00"), 2900, 2, None)]
    assert tables["plan_metrics"] == [
        # ..., rounding, free_units, max_spend (docs/PRICING.md "Package options"), min_spend
        ("starter", "api_calls", "", "graduated", None, None, "up", D(0), None, None),
        ("starter", "storage_gb", "", "package", D(100), D("1.50"), "up", D(0), None, None),
    ]
    assert tables["plan_tiers"] == [  # ..., unit_price, block_size, block_price, flat_amount
        ("starter", "api_calls", "", 0, D(0), D(100000), D("0"), None, None, D(0)),
        ("starter", "api_calls", "", 1, D(100000), D(1000000), D("0.0002"), None, None, D(0)),
        ("starter", "api_calls", "", 2, D(1000000), None, D("0.0001"), None, None, D(0)),
    ]
    assert tables["metrics"] == [
        ("api_calls", "call", "API requests", "sum", None, []),
        ("storage_gb", "GB", "", "sum", None, []),
    ]


def test_catalog_tables_shipped_is_consistent():
    catalog = load_catalog(SHIPPED)
    tables = catalog_tables(catalog)
    assert {row[0] for row in tables["plans"]} == set(catalog.plans)
    assert {row[0] for row in tables["metrics"]} == set(catalog.metrics)
    tokyo = next(row for row in tables["plans"] if row[0] == "tokyo")
    assert tokyo == ("tokyo", "jpy", D("3000"), 3000, 0, None)
    for plan, metric, _mode, *_ in tables["plan_metrics"]:
        assert metric in catalog.plan(plan).metrics


def test_catalog_version_is_canonical(tmp_path):
    base = parse_catalog(base_catalog())
    version = catalog_version(base)
    assert re.fullmatch("[0-9a-f]{64}", version), version  # a sha256 hex digest
    # Formatting, key order, trailing zeros and currency case do not change the version.
    doc = base_catalog()
    doc["plans"]["starter"]["base_fee"] = "29"
    doc["plans"]["starter"]["currency"] = "USD"
    doc["plans"]["starter"]["metrics"]["api_calls"]["tiers"][1]["unit_price"] = "0.00020"
    doc["plans"]["starter"]["metrics"]["api_calls"]["tiers"][0]["up_to"] = "100000.0"
    doc["plans"]["starter"]["metrics"] = dict(reversed(doc["plans"]["starter"]["metrics"].items()))
    assert catalog_version(parse_catalog(doc)) == version
    path = tmp_path / "c.yaml"
    path.write_text("# a comment\n" + yaml.safe_dump(base_catalog(), sort_keys=False))
    assert catalog_version(path) == version
    assert catalog_version(str(path)) == version
    # A price change does.
    doc["plans"]["starter"]["metrics"]["api_calls"]["tiers"][1]["unit_price"] = "0.00021"
    assert catalog_version(parse_catalog(doc)) != version


# ---------------------------------------------------------------- the quantity range
def _shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["plans"]["starter"]["metrics"]["api_calls"]["tiers"][2].update(
                unit_price="100000"
            ),
            "catalog: plan 'starter' metric 'api_calls' tiers[2].unit_price: 1000000000000 units"
            " in a month would cost 9999990000000018000 minor units, above the limit of"
            " 100000000000000000 (the quantity range is in docs/PRICING.md)",
        ),
        (  # volume: the peak is at the top of a tier, not at the top of the range
            lambda d: d["plans"]["growth"]["metrics"]["api_calls"]["tiers"][1].update(
                unit_price="100000000.01"
            ),
            "catalog: plan 'growth' metric 'api_calls' tiers[1].unit_price: 10000000 units in a"
            " month would cost 100000000010000000 minor units",
        ),
        (
            lambda d: d["plans"]["growth"]["metrics"]["storage_gb"].update(package_size="0.000001"),
            "catalog: plan 'growth' metric 'storage_gb' package_price: 1000000000000 units in a"
            " month would cost 125000000000000000000 minor units",
        ),
        (
            lambda d: d["plans"]["tokyo"].update(base_fee="100000000000000001"),
            "catalog: plan 'tokyo' base_fee: '100000000000000001' is above the limit of"
            " 100000000000000000 minor units",
        ),
    ],
)
def test_catalog_refuses_prices_that_overflow_within_the_quantity_range(edit, message):
    doc = _shipped()
    edit(doc)
    with pytest.raises(ConfigError) as err:
        parse_catalog(doc)
    assert str(err.value).startswith(message)


def test_the_shipped_catalog_prices_the_whole_range():
    from billing.pricing.catalog import AMOUNT_MAX_MINOR, MONTHLY_QUANTITY_MAX

    catalog = load_catalog()
    for plan in catalog.plans.values():
        for mp in plan.metrics.values():
            assert to_minor(price(mp, MONTHLY_QUANTITY_MAX), plan.currency) <= AMOUNT_MAX_MINOR
    # a volume price that reaches the limit exactly is accepted (the edge of the check)
    doc = _shipped()
    doc["plans"]["growth"]["metrics"]["api_calls"]["tiers"][1]["unit_price"] = "100000000"
    parse_catalog(doc)


# ---------------------------------------------------------------- flat amount per tier
def test_volume_with_a_flat_fee_lagos_worked_example():
    # Lago, "Volume" charge model (getlago.com/docs/guide/plans/charges/charge-models/volume):
    # 0-10,000 at $0.0010, 10,001-50,000 at $0.0008, 50,001-100,000 at $0.0006, then
    # $0.0004, each tier with a $10 fee: "65,000 API calls would cost 65,000 x $0.0006 +
    # $10 = $49."
    tiers = [("10000", "0.0010"), ("50000", "0.0008"), ("100000", "0.0006"), (None, "0.0004")]
    mp = MetricPrice(
        metric="api_calls",
        mode="volume",
        tiers=tuple(Tier(None if u is None else D(u), D(p), D(10)) for u, p in tiers),
    )
    assert price(mp, D(65000)) == D("49.0000")
    assert to_minor(price(mp, D(65000)), "usd") == 4900
    assert price(mp, D(10000)) == D("20.0000")  # the top of the first tier: 10 + 10
    assert price(mp, D(0)) == 0  # no usage reaches no tier: C(0) = 0


def test_graduated_with_flat_fees_charges_each_tier_reached_once():
    # Stripe's tiers[].flat_amount: "the flat billing amount for an entire tier, regardless
    # of the number of units in the tier"; graduated pricing bills every tier the usage
    # reaches (docs.stripe.com/products-prices/pricing-models, "Graduated"). Lago and
    # OpenMeter's graduated flat fee per tier is the same rule.
    mp = MetricPrice(
        metric="m",
        mode="graduated",
        tiers=(
            Tier(D(5), D(0), D("10.00")),
            Tier(D(10), D("5.00"), D("2.00")),
            Tier(None, D("1.00"), D(0)),
        ),
    )
    assert [price(mp, D(q)) for q in (0, 3, 5, 6, 7, 10, 12)] == [
        D(0), D(10), D(10), D(17), D(22), D(37), D(39),
    ]  # fmt: skip
    # Daily pushes telescope: the tier's fee lands on the day the usage reaches it.
    assert cumulative_charges(mp, "usd", [D(3), D(4), D(5)]) == [1000, 2200, 3900]
    assert daily_charges(mp, "usd", [D(3), D(4), D(5)]) == [1000, 1200, 1700]


def test_flat_amount_in_the_catalog_and_its_version():
    doc = base_catalog()
    tiers = doc["plans"]["starter"]["metrics"]["api_calls"]["tiers"]
    before = catalog_version(parse_catalog(doc))
    tiers[0]["flat_amount"] = "0"
    assert catalog_version(parse_catalog(doc)) == before  # an explicit 0 means none
    tiers[1]["flat_amount"] = "5.00"
    catalog = parse_catalog(doc)
    assert catalog_version(catalog) != before
    assert catalog.plan("starter").metrics["api_calls"].tiers[1].flat_amount == D(5)
    assert catalog_tables(catalog)["plan_tiers"][1][-1] == D("5.00")
    # 100,001 calls: 1 call into tier 2 at $0.0002 plus its $5 fee, + the $29 base fee.
    assert invoice_total(catalog.plan("starter"), {"api_calls": D(100001)}) == 2900 + 500
