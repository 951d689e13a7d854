"""Minimum spend per metric and minimum commitment per plan (billing.pricing.reference): true-up
lines once the period is over, none while it is open."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D

import pytest

from billing.platform.errors import ConfigError
from billing.pricing import aggregation as agg
from billing.pricing import catalog as pricing
from billing.pricing import reference

JAN = dt.date(2027, 1, 1)
OPEN = dt.date(2027, 1, 30)  # a run day before January's last: the usage may still grow
CLOSED = dt.date(2027, 1, 31)  # the run of January's last day: the minimums apply


def _catalog(plan: dict) -> pricing.Catalog:
    return pricing.parse_catalog(
        {
            "metrics": {
                "api_calls": {"unit": "call"},
                "storage_gb": {"unit": "GB"},
                "tokens": {"unit": "token", "dimensions": ["model"]},
            },
            "plans": {"p": {"currency": "usd", "base_fee": "10.00", **plan}},
        }
    )


def _events(*qty_by_metric: tuple[str, int]) -> list[tuple[str, agg.BillableEvent]]:
    at = dt.datetime(2027, 1, 5, 12, tzinfo=dt.UTC)
    return [(m, agg.BillableEvent(f"e{i}", at, D(q))) for i, (m, q) in enumerate(qty_by_metric)]


PER_CALL = {"mode": "graduated", "tiers": [{"up_to": None, "unit_price": "0.01"}]}


def test_lago_spending_minimum_true_up_after_the_period():
    """Lago, "Spending minimums" (getlago.com/docs/v2/guide/rate-cards/spending-minimums): if
    the rate's amount for the period is below its minimum, a true-up fee adds the difference.
    1,200 calls at $0.01 = $12.00 under a $50.00 minimum: a $38.00 true-up; $62.00 of usage
    needs none. While January is open nothing is added (usage may still reach the minimum)."""
    catalog = _catalog({"metrics": {"api_calls": {**PER_CALL, "min_spend": "50.00"}}})
    plan = catalog.plan("p")
    low = _events(("api_calls", 1200))
    series = reference.period_charges(catalog, plan, low, JAN, CLOSED)
    assert reference.true_ups(plan, series, JAN, CLOSED) == {"minimum_spend.api_calls": 3800}
    assert reference.period_total(catalog, plan, low, JAN, CLOSED) == 1000 + 1200 + 3800
    assert reference.true_ups(plan, series, JAN, OPEN) == {}
    assert reference.period_total(catalog, plan, low, JAN, OPEN) == 1000 + 1200
    high = _events(("api_calls", 6200))
    assert reference.period_total(catalog, plan, high, JAN, CLOSED) == 1000 + 6200
    # an unused metric still owes its minimum
    assert reference.period_total(catalog, plan, [], JAN, CLOSED) == 1000 + 5000


def test_lago_minimum_commitment_covers_usage_after_the_minimums():
    """Lago, "Minimum commitment" (getlago.com/docs/guide/plans/commitments/minimum-commitment):
    the customer pays at least the commitment for the period; a true-up adds the shortfall.
    Here it covers the usage charges (the base fee is paid anyway) plus the metrics' own
    true-ups: $12.00 of calls raised to $50.00 by its minimum, $3.00 of storage: $53.00
    against a $100.00 commitment, a $47.00 true-up."""
    catalog = _catalog(
        {
            "minimum_commitment": "100.00",
            "metrics": {
                "api_calls": {**PER_CALL, "min_spend": "50.00"},
                "storage_gb": {"mode": "package", "package_size": 100, "package_price": "1.50"},
            },
        }
    )
    plan = catalog.plan("p")
    events = _events(("api_calls", 1200), ("storage_gb", 150))
    series = reference.period_charges(catalog, plan, events, JAN, CLOSED)
    assert reference.true_ups(plan, series, JAN, CLOSED) == {
        "minimum_spend.api_calls": 3800,
        "minimum_commitment": 4700,
    }
    assert reference.period_total(catalog, plan, events, JAN, CLOSED) == 1000 + 10000
    # usage above the commitment: no true-up at all
    big = _events(("api_calls", 20000))
    assert reference.period_total(catalog, plan, big, JAN, CLOSED) == 1000 + 20000


def test_a_dimensioned_metric_counts_toward_the_commitment():
    catalog = _catalog({"minimum_commitment": "5.00", "metrics": {"tokens": PER_CALL}})
    plan = catalog.plan("p")
    at = dt.datetime(2027, 1, 5, tzinfo=dt.UTC)
    events = [
        ("tokens", agg.BillableEvent("a", at, D(100), {"model": "x"})),
        ("tokens", agg.BillableEvent("b", at, D(200), {"model": "y"})),
    ]
    assert reference.period_total(catalog, plan, events, JAN, CLOSED) == 1000 + 300 + 200


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (
            {"metrics": {"api_calls": {**PER_CALL, "min_spend": "50.005"}}},
            "catalog: plan 'p' metric 'api_calls' min_spend: '50.005' has more decimal places "
            "than usd allows (2)",
        ),
        (
            {"metrics": {"api_calls": {**PER_CALL, "min_spend": 50}}},
            "catalog: plan 'p' metric 'api_calls' min_spend: money must be a quoted decimal",
        ),
        (
            {"metrics": {"api_calls": {**PER_CALL, "min_spend": "60", "max_spend": "50"}}},
            "catalog: plan 'p' metric 'api_calls' min_spend: '60' is above the max_spend '50'",
        ),
        (
            {"metrics": {"tokens": {**PER_CALL, "min_spend": "5.00"}}},
            "catalog: plan 'p' metric 'tokens' min_spend: a dimensioned metric takes no "
            "min_spend (use the plan's minimum_commitment)",
        ),
        (
            {"minimum_commitment": "-1"},
            "catalog: plan 'p' minimum_commitment: must not be negative",
        ),
        (
            {"minimum_commitment": "1000000000000000.01"},
            "catalog: plan 'p' minimum_commitment: '1000000000000000.01' is above the limit",
        ),
    ],
)
def test_catalog_names_the_plan_metric_and_field(plan, message):
    with pytest.raises(ConfigError) as exc:
        _catalog(plan)
    assert str(exc.value).startswith(message)


def test_catalog_rows_and_version():
    plain = _catalog({"metrics": {"api_calls": PER_CALL}})
    with_min = _catalog(
        {"minimum_commitment": "100", "metrics": {"api_calls": {**PER_CALL, "min_spend": "50"}}}
    )
    tables = pricing.catalog_tables(with_min)
    assert tables["plans"][0][-1] == 10000  # minimum_commitment_cents
    assert tables["plan_metrics"][0][-1] == 5000  # min_spend_cents
    assert pricing.catalog_version(plain) != pricing.catalog_version(with_min)
    assert pricing.catalog_tables(plain)["plans"][0][-1] is None


def test_openmeter_minimum_amount_commits_the_charge():
    """OpenMeter's usage prices take minimumAmount, "the customer is committed to spend at
    least the amount" over the billing period (OpenMeter API, UnitPriceWithCommitments;
    openmeter.io/docs/billing/product-catalog/pricing-models): $0.002 per call with a $10.00
    minimum; 3,000 calls ($6.00) are billed $10.00, 8,000 calls ($16.00) as used."""
    price = {"mode": "graduated", "tiers": [{"up_to": None, "unit_price": "0.002"}]}
    catalog = _catalog({"metrics": {"api_calls": {**price, "min_spend": "10.00"}}})
    plan = catalog.plan("p")
    for calls, usage in ((3000, 1000), (8000, 1600)):
        events = _events(("api_calls", calls))
        assert reference.period_total(catalog, plan, events, JAN, CLOSED) == 1000 + usage
