"""billing.pricing.reference's segments and proration (docs/SUBSCRIPTIONS.md): pure rules,
checked against dbt on the real stack by tests/billing/transform/test_subscription_pricing.py."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.platform.errors import ConfigError
from billing.pricing import aggregation as agg
from billing.pricing import catalog as pricing
from billing.pricing import reference

MARCH = dt.date(2025, 3, 1)


def _catalog(fee: str) -> pricing.Catalog:
    return pricing.parse_catalog(
        {
            "metrics": {"api_calls": {"unit": "call"}},
            "plans": {
                p: {
                    "currency": "usd",
                    "base_fee": fee,
                    "metrics": {
                        "api_calls": {
                            "mode": "graduated",
                            "tiers": [{"up_to": None, "unit_price": "0.01"}],
                        }
                    },
                }
                for p in ("starter", "pro")
            },
        },
        f"fee {fee}",
    )


def test_prorate_rounds_half_up_once():
    assert reference.prorate(2900, 14, 31) == 1310  # 1309.677...
    assert reference.prorate(2900, 17, 31) == 1590  # 1590.322...
    assert reference.prorate(100, 1, 2) == 50
    assert reference.prorate(101, 1, 2) == 51  # 50.5 -> 51 (half up)
    assert reference.prorate(3, 1, 6) == 1  # 0.5 -> 1
    assert reference.prorate(9900, 31, 31) == 9900
    assert reference.prorate(0, 10, 31) == 0


@given(st.integers(0, 10**12), st.integers(28, 31), st.data())
def test_prorate_is_the_exact_decimal_rounded_half_up(amount, period_days, data):
    days = data.draw(st.integers(1, period_days))
    exact = Decimal(amount) * days / Decimal(period_days)
    want = int(exact.quantize(Decimal(1), rounding="ROUND_HALF_UP"))
    assert reference.prorate(amount, days, period_days) == want


def test_segments_cut_by_subscriptions_and_catalog_versions():
    v1, v2, v3 = _catalog("29"), _catalog("39"), _catalog("49")
    subs = [
        ("starter", None, dt.date(2025, 3, 10)),
        # a gap 10th-11th: no plan, not billed
        ("pro", dt.date(2025, 3, 12), None),
    ]
    # v2 from the 20th, then v3 from the same day activated later: v3 wins
    activations = [(v1, None), (v2, dt.date(2025, 3, 20)), (v3, dt.date(2025, 3, 20))]
    got = [
        (g.start.day, g.end, g.plan.name, g.catalog.plans["pro"].base_fee, g.days, g.label_suffix)
        for g in reference.segments(subs, activations, MARCH)
    ]
    assert got == [
        (1, dt.date(2025, 3, 10), "starter", Decimal(29), 9, ""),
        (12, dt.date(2025, 3, 20), "pro", Decimal(29), 8, " from 2025-03-12"),
        (20, dt.date(2025, 4, 1), "pro", Decimal(49), 12, " from 2025-03-20"),
    ]
    # a newer activation replaces the older ones from its day on, later-dated ones included
    got = reference.segments(subs, [*activations, (v2, dt.date(2025, 3, 5))], MARCH)
    assert [(g.start.day, g.catalog is v2) for g in got] == [(1, False), (5, True), (12, True)]


def test_invoice_lines_restart_tiers_and_carry_a_held_time_weighted_value():
    catalog = pricing.parse_catalog(
        {
            "metrics": {
                "api_calls": {"unit": "call"},
                "seats": {"unit": "seat", "aggregation": "time_weighted"},
            },
            "plans": {
                plan: {
                    "currency": "usd",
                    "base_fee": "0",
                    "metrics": {
                        "api_calls": {
                            "mode": "graduated",
                            "tiers": [
                                {"up_to": 100, "unit_price": "0"},
                                {"up_to": None, "unit_price": "1"},
                            ],
                        },
                        "seats": {
                            "mode": "graduated",
                            "tiers": [{"up_to": None, "unit_price": "0.01"}],
                        },
                    },
                }
                for plan in ("starter", "basic")
            },
        },
        "t",
    )
    # back to back on one plan is one interval: nothing restarts
    whole = reference.segments(
        [("starter", None, dt.date(2025, 3, 16)), ("starter", dt.date(2025, 3, 16), None)],
        [(catalog, None)],
        MARCH,
    )
    assert [(g.start, g.end) for g in whole] == [(MARCH, dt.date(2025, 4, 1))]
    segs = reference.segments(
        [("starter", None, dt.date(2025, 3, 16)), ("basic", dt.date(2025, 3, 16), None)],
        [(catalog, None)],
        MARCH,
    )

    def at(day: int) -> dt.datetime:
        return dt.datetime(2025, 3, day, tzinfo=dt.UTC)

    events = [
        ("api_calls", agg.BillableEvent("a", at(2), Decimal(150))),
        ("api_calls", agg.BillableEvent("b", at(20), Decimal(150))),
        # 2 seats from the 1st, held through the whole month: 15 days before, 16 after
        ("seats", agg.BillableEvent("s", at(1), Decimal(2))),
    ]
    lines = reference.invoice_lines(segs, events, dt.date(2025, 3, 31))
    assert lines == {
        "api_calls": 5000,  # 100 free, 50 x $1: the free tier again after the split
        "api_calls from 2025-03-16": 5000,
        "seats": 720,  # 2 seats x 360 h x $0.01
        "seats from 2025-03-16": 768,  # 2 x 384 h: the held value carries in
    }


@pytest.mark.parametrize("name", ["base_fee", "minimum_commitment", "minimum_spend", "credit"])
def test_a_metric_may_not_take_a_reserved_charge_label(name):
    with pytest.raises(ConfigError, match=f"metric '{name}': is reserved"):
        pricing.parse_catalog(
            {
                "metrics": {name: {"unit": "x"}},
                "plans": {"p": {"currency": "usd", "base_fee": "1", "metrics": {}}},
            },
            "t",
        )


def test_metric_labels_are_told_from_fees_true_ups_and_credits():
    assert pricing.is_metric_label("api_calls from 2025-01-16")
    assert pricing.is_metric_label('ai_tokens ["a", null] from 2025-01-02')
    for label in (
        "base_fee",
        "credit",
        "minimum_commitment from 2025-03-15",
        "minimum_spend.api_calls",
        "minimum_spend.api_calls from 2025-03-15",
    ):
        assert not pricing.is_metric_label(label)
