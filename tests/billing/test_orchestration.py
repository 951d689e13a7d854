"""The arrival-day convention (pure logic): one logical date per arrival day."""

from __future__ import annotations

import datetime as dt

import pytest

from billing.orchestration import arrival_day, arrival_interval, arrival_run_id, logical_date_of

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
