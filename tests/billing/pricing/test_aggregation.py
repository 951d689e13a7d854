"""The aggregations turn a metric's events into Q(d) (billing.pricing.aggregation); worked
examples from public docs, ties, the time-weighted formula, and the charges they telescope to."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D

import pytest

from billing.platform.errors import ConfigError
from billing.pricing import aggregation as agg
from billing.pricing import catalog as pricing

UTC = dt.UTC


def at(day: int, hour: int = 0, minute: int = 0, second: int = 0, month: int = 1) -> dt.datetime:
    return dt.datetime(2027, month, day, hour, minute, second, tzinfo=UTC)


def ev(event_id: str, when: dt.datetime, quantity, **props) -> agg.BillableEvent:
    return agg.BillableEvent(event_id, when, D(quantity), props or None)


# Lago, "Aggregation examples" (getlago.com/docs/v2/guide/billable-metrics/aggregation-types/
# aggregation-examples): two tracked_pages events for one tracked user, 10 pageviews on
# January 16 and 20 on January 17. Count 2, sum 30, unique count 1, max 20, latest 20.
LAGO = [
    ev("1111-1111-1111-1111", at(16), 10, tracked_user_id="1234-5678-9098-7654"),
    ev("2222-2222-2222-2222", at(17), 20, tracked_user_id="1234-5678-9098-7654"),
]


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [("count", 2), ("sum", 30), ("unique_count", 1), ("max", 20), ("latest", 20)],
)
def test_lago_aggregation_examples(aggregation, expected):
    days = [dt.date(2027, 1, 16), dt.date(2027, 1, 17)]
    q = agg.period_to_date(aggregation, LAGO, days, "tracked_user_id")
    assert q[-1] == D(expected)


def test_period_to_date_through_each_day():
    events = [
        ev("a", at(1, 9), 5, user="u1"),
        ev("b", at(1, 18), 2, user="u2"),
        ev("c", at(3, 12), 4, user="u1"),
        ev("d", at(4, 1), 1),  # no user: counts as an event, adds no unique value
    ]
    days = [dt.date(2027, 1, d) for d in (1, 3, 4)]
    assert agg.period_to_date("sum", events, days) == [D(7), D(11), D(12)]
    assert agg.period_to_date("count", events, days) == [D(2), D(3), D(4)]
    assert agg.period_to_date("unique_count", events, days, "user") == [D(2), D(2), D(2)]
    assert agg.period_to_date("max", events, days) == [D(5), D(5), D(5)]
    # latest falls from 4 to 1: the day's charge is negative
    assert agg.period_to_date("latest", events, days) == [D(2), D(4), D(1)]


def test_latest_ties_go_to_the_greatest_event_id_in_byte_order():
    same = at(5, 12)
    events = [ev("b-10", same, 7), ev("B-9", same, 3), ev("b-9", same, 9)]
    # byte order: "B-9" < "b-10" < "b-9", so "b-9" is the latest, whatever the input order
    assert agg.period_to_date("latest", events, [dt.date(2027, 1, 5)]) == [D(9)]
    assert agg.period_to_date("latest", events[::-1], [dt.date(2027, 1, 5)]) == [D(9)]


def test_unique_count_compares_values_as_postgres_text():
    events = [
        ev("a", at(1), 1, user="7"),
        ev("b", at(1), 1, user=7),  # ->> gives "7" for both
        ev("c", at(1), 1, user=True),
        ev("d", at(1), 1, user=None),  # JSON null: no value
        ev("e", at(1), 1),
    ]
    assert agg.period_to_date("unique_count", events, [dt.date(2027, 1, 1)], "user") == [D(2)]
    with pytest.raises(ValueError, match="needs a property"):
        agg.period_to_date("unique_count", events, [dt.date(2027, 1, 1)])


def test_time_weighted_gb_hours():
    """20 GB from 16 Jan 00:00, 10 GB from 18 Jan 00:00, 0 GB from 20 Jan 12:00 (2027).

    Through 17 Jan: 20 GB x 48 h = 960 GB-h. Through 18 Jan: 960 + 10 x 24 = 1,200.
    Through 20 Jan: 960 + 10 x 60 h = 1,560, then 0 GB holds: 1,560 through 31 Jan."""
    events = [ev("e1", at(16), 20), ev("e2", at(18), 10), ev("e3", at(20, 12), 0)]
    days = [dt.date(2027, 1, d) for d in (16, 17, 18, 19, 20, 21, 31)]
    assert agg.period_to_date("time_weighted", events, days) == [
        D(480),
        D(960),
        D(1200),
        D(1440),
        D(1560),
        D(1560),
        D(1560),
    ]


def test_time_weighted_rounds_the_sum_once_half_up_to_nine_places():
    # 1 unit for 1 second = 1/3600 h = 0.000277777(7)... -> 0.000277778
    one_second = [ev("a", at(1, 23, 59, 59), 1)]
    assert agg.period_to_date("time_weighted", one_second, [dt.date(2027, 1, 1)]) == [
        D("0.000277778")
    ]
    # 0.1 unit for 18 µs = 1.8 unit-µs = 0.0000000005 h exactly: the half rounds up
    exact_half = [ev("a", dt.datetime(2027, 1, 1, 23, 59, 59, 999_982, tzinfo=UTC), D("0.1"))]
    assert agg.period_to_date("time_weighted", exact_half, [dt.date(2027, 1, 1)]) == [
        D("0.000000001")
    ]
    # 0.1 unit for 17 µs = 0.000000000472... h: rounds down to 0
    below = [ev("a", dt.datetime(2027, 1, 1, 23, 59, 59, 999_983, tzinfo=UTC), D("0.1"))]
    assert agg.period_to_date("time_weighted", below, [dt.date(2027, 1, 1)]) == [D(0)]


def test_time_weighted_ties_hold_the_later_event_id():
    same = at(2)
    events = [ev("x", same, 100), ev("y", same, 1)]
    assert agg.period_to_date("time_weighted", events, [dt.date(2027, 1, 2)]) == [D(24)]


def test_charge_days():
    days = [dt.date(2027, 1, 3), dt.date(2027, 1, 5)]
    end = dt.date(2027, 1, 31)
    assert agg.charge_days("max", days, end, dt.date(2027, 1, 20)) == days
    # time-weighted: every day from the first event through the run day while open ...
    assert agg.charge_days("time_weighted", days, end, dt.date(2027, 1, 6)) == [
        dt.date(2027, 1, d) for d in range(3, 7)
    ]
    # ... or the last event day if later (a backfill of an earlier day), and the period's
    # end once the period is over
    assert agg.charge_days("time_weighted", days, end, dt.date(2027, 1, 4))[-1] == days[-1]
    assert agg.charge_days("time_weighted", days, end, dt.date(2027, 2, 2))[-1] == end
    assert agg.charge_days("time_weighted", [], end, end) == []


def test_a_falling_latest_value_pushes_a_negative_day_and_telescopes():
    mp = pricing.MetricPrice(
        "seats", pricing.GRADUATED, (pricing.Tier(up_to=None, unit_price=D("10.00")),)
    )
    events = [ev("a", at(1), 5), ev("b", at(2), 2), ev("c", at(3), 3)]
    days = [dt.date(2027, 1, d) for d in (1, 2, 3)]
    cumulative = pricing.charges(mp, "usd", agg.period_to_date("latest", events, days))
    assert cumulative == [5000, 2000, 3000]
    daily = [c - p for c, p in zip(cumulative, [0, *cumulative], strict=False)]
    assert daily == [5000, -3000, 1000]
    assert sum(daily) == cumulative[-1]


BASE = {
    "metrics": {"users": {"unit": "user"}},
    "plans": {"p": {"currency": "usd", "base_fee": "0"}},
}


def _catalog(metric: dict) -> pricing.Catalog:
    return pricing.parse_catalog({**BASE, "metrics": {"users": metric}})


def test_catalog_reads_aggregations():
    c = _catalog({"unit": "user", "aggregation": "unique_count", "property": "user_id"})
    assert (c.metrics["users"].aggregation, c.metrics["users"].property) == (
        "unique_count",
        "user_id",
    )
    assert _catalog({"unit": "user"}).metrics["users"].aggregation == "sum"
    tables = pricing.catalog_tables(c)
    assert tables["metrics"] == [("users", "user", "", "unique_count", "user_id", [])]


def test_catalog_version_changes_with_the_aggregation_only():
    plain = pricing.catalog_version(_catalog({"unit": "user"}))
    assert pricing.catalog_version(_catalog({"unit": "user", "aggregation": "sum"})) == plain
    assert pricing.catalog_version(_catalog({"unit": "user", "aggregation": "max"})) != plain


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (
            {"unit": "u", "aggregation": "avg"},
            "catalog: metric 'users' aggregation: unknown aggregation 'avg' (expected one of: "
            "sum, count, unique_count, max, latest, time_weighted)",
        ),
        (
            {"unit": "u", "aggregation": "unique_count"},
            "catalog: metric 'users' property: missing (unique_count counts distinct values of "
            "an event property)",
        ),
        (
            {"unit": "u", "aggregation": "unique_count", "property": "user id"},
            "catalog: metric 'users' property: must match",
        ),
        (
            {"unit": "u", "aggregation": "max", "property": "user_id"},
            "catalog: metric 'users' property: only a unique_count metric reads a property "
            "(this one aggregates max)",
        ),
        ({"unit": "u", "aggregate": "max"}, "catalog: metric 'users' aggregate: unknown key"),
    ],
)
def test_catalog_names_the_metric_and_field_of_a_bad_aggregation(metric, message):
    with pytest.raises(ConfigError) as exc:
        _catalog(metric)
    assert str(exc.value).startswith(message)
