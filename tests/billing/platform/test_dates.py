"""The time vocabulary (pure logic): one logical date per arrival day, its run end, periods."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from billing.platform.dates import (
    OPTIONAL_PERIOD_PATTERN,
    PERIOD_PATTERN,
    arrival_day,
    arrival_interval,
    arrival_run_id,
    day_start,
    logical_date_of,
    month_end,
    parse_period,
    period_close,
    period_from,
    period_of,
    run_end,
)

D = dt.date(2026, 11, 3)
UTC = dt.UTC


def test_logical_date_and_interval_of_an_arrival_day():
    assert logical_date_of(D) == dt.datetime(2026, 11, 3, tzinfo=UTC)
    assert arrival_interval(D) == (
        dt.datetime(2026, 11, 3, tzinfo=UTC),
        dt.datetime(2026, 11, 4, tzinfo=UTC),
    )
    # Month and year ends roll over; the interval is always one UTC day.
    assert arrival_interval(dt.date(2026, 12, 31))[1] == dt.datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "day"),
    [
        (dt.datetime(2026, 11, 3, tzinfo=UTC), D),
        (dt.datetime(2026, 11, 3, 10, 23, tzinfo=UTC), D),
        (dt.datetime(2026, 11, 3, 23, 59, 59, tzinfo=UTC), D),
        # The UTC day counts, whatever zone the logical date is written in.
        (dt.datetime(2026, 11, 2, 21, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))), D),
        (dt.datetime(2026, 11, 4, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))), D),
    ],
)
def test_arrival_day_is_the_utc_day_of_the_logical_date(moment, day):
    assert arrival_day(moment) == day


def test_round_trip_and_reruns_stay_on_the_day():
    assert arrival_day(logical_date_of(D)) == D
    assert logical_date_of(D, 1) == dt.datetime(2026, 11, 3, 0, 0, 1, tzinfo=UTC)
    assert arrival_day(logical_date_of(D, 86_399)) == D
    with pytest.raises(ValueError, match="rerun must be in 0..86399"):
        logical_date_of(D, 86_400)


def test_a_run_without_logical_date_has_no_arrival_day():
    with pytest.raises(ValueError, match="billing_nightly needs a logical date"):
        arrival_day(None)


def test_run_id_names_the_arrival_day():
    run_after = dt.datetime(2026, 11, 4, tzinfo=UTC)
    assert (
        arrival_run_id("scheduled", D, run_after)
        == "scheduled__arrival-2026-11-03_2026-11-04T00:00:00+00:00"
    )


def test_run_end_is_the_next_midnight_utc():
    assert run_end(D) == dt.datetime(2026, 11, 4, tzinfo=UTC)
    assert run_end(dt.date(2026, 12, 31)) == dt.datetime(2027, 1, 1, tzinfo=UTC)


def test_day_start_is_the_days_midnight_utc():
    assert day_start(D) == dt.datetime(2026, 11, 3, tzinfo=UTC)
    assert day_start(D) == arrival_interval(D)[0]


@pytest.mark.parametrize(
    ("day", "period", "last"),
    [
        (dt.date(2026, 11, 3), dt.date(2026, 11, 1), dt.date(2026, 11, 30)),
        (dt.date(2026, 12, 31), dt.date(2026, 12, 1), dt.date(2026, 12, 31)),
        (dt.date(2028, 2, 1), dt.date(2028, 2, 1), dt.date(2028, 2, 29)),  # leap year
        (dt.date(2027, 2, 28), dt.date(2027, 2, 1), dt.date(2027, 2, 28)),
        (dt.date(2026, 1, 31), dt.date(2026, 1, 1), dt.date(2026, 1, 31)),
    ],
)
def test_period_and_month_end_of_a_day(day, period, last):
    assert period_of(day) == period
    assert month_end(day) == last
    assert month_end(period) == last


@pytest.mark.parametrize(
    ("text", "period", "optional"),
    [
        ("2026-11", True, True),
        ("2026-01", True, True),
        ("2026-12", True, True),
        ("", False, True),
        ("2026-13", False, False),
        ("2026-00", False, False),
        ("2026-1", False, False),
        ("2026-11-03", False, False),
        (" 2026-11", False, False),
    ],
)
def test_period_patterns(text, period, optional):
    assert bool(re.search(PERIOD_PATTERN, text)) is period
    assert bool(re.search(OPTIONAL_PERIOD_PATTERN, text)) is optional


@pytest.mark.parametrize(
    ("text", "first", "close"),
    [
        ("2026-11", dt.date(2026, 11, 1), dt.datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12", dt.date(2026, 12, 1), dt.datetime(2027, 1, 1, tzinfo=UTC)),
        ("2028-02", dt.date(2028, 2, 1), dt.datetime(2028, 3, 1, tzinfo=UTC)),
    ],
)
def test_a_period_by_name_and_its_close(text, first, close):
    assert parse_period(text) == first
    assert period_close(first) == close
    assert period_close(month_end(first)) == close


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "2026-11-03", "", None])
def test_a_period_name_is_yyyy_mm(text):
    with pytest.raises(ValueError, match="expected YYYY-MM"):
        parse_period(text)


@pytest.mark.parametrize(
    ("value", "period"),
    [
        ("2026-11", dt.date(2026, 11, 1)),
        ("2026-11-30", dt.date(2026, 11, 1)),
        (dt.date(2026, 12, 31), dt.date(2026, 12, 1)),
        # 23:30 on 30 Nov in New York is 1 Dec in UTC: the UTC day decides.
        (
            dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            dt.date(2026, 12, 1),
        ),
        (dt.datetime(2026, 11, 30, 23, 30), dt.date(2026, 11, 1)),  # naive: taken as UTC
    ],
)
def test_period_from_a_name_a_day_or_a_moment(value, period):
    assert period_from(value) == period


@pytest.mark.parametrize("text", ["2026-13", "2026-11-31", "11/2026", "", "2026"])
def test_period_from_refuses_what_is_no_period(text):
    with pytest.raises(ValueError, match="invalid period|expected YYYY-MM"):
        period_from(text)
