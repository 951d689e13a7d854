"""Text for people: money with its currency, exact numbers, aligned tables (pure logic)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.platform.tables import money, number, render


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (98561, "eur", "€985.61"),
        (3600, "jpy", "¥3,600"),
        (-1250, "usd", "-$12.50"),
        (5, "USD", "$0.05"),
        (None, "usd", "–"),
        (12, "xyz", "12 xyz"),
    ],
)
def test_money_shows_the_currency_and_its_exponent(minor, currency, text):
    assert money(minor, currency) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("150.5000000000000000000"), "150.5"),
        (Decimal("150.0000000000000000000"), "150"),
        (Decimal("0E-19"), "0"),
        (Decimal("-0.0000000000000000000"), "0"),
        (Decimal("1E+3"), "1000"),
        (Decimal("0.0002"), "0.0002"),
        (None, "NULL"),
        (True, "true"),
    ],
)
def test_numbers_keep_their_value_without_padding(value, text):
    assert number(value) == text


def test_table_aligns_columns_and_right_aligns_numbers():
    out = render(
        ("org", "n", "total"), [("a", 5, "$1.00"), ("bbb", 12345, "$10.00")], right=["total"]
    )
    assert out.splitlines() == [
        "org      n   total",
        "---  -----  ------",
        "a        5   $1.00",
        "bbb  12345  $10.00",
    ]


def test_empty_table_says_so():
    assert render(("a", "b"), [], empty="(no invoices)").splitlines() == ["a  b", "(no invoices)"]
