"""The one time vocabulary: arrival day, run end, period, month end and the period pattern.

Every flow, DAG, CLI command and the web layer derives days and periods from here, so
"the run for D ends at D+1 00:00 UTC" and "a period is a calendar month" are written once.
Pure functions of their arguments: nothing here reads a clock.
"""

from __future__ import annotations

import datetime as dt
import re


def day_of(moment) -> dt.date:
    """The UTC day of an aware datetime (a data interval bound, a logical date)."""
    return dt.datetime.fromtimestamp(moment.timestamp(), tz=dt.UTC).date()


# ---------------------------------------------------------------- the arrival-day convention
# billing_nightly works on one *arrival day* D (the landing zone's dt=D folder): the UTC day of
# its logical date, data interval [D 00:00, D+1 00:00) UTC. The scheduler creates that run once D
# has ended (run after D+1 00:00); backfills, the Trigger form, `airflow dags test` and
# `billing run-day` all give the same logical date for the same day (billing.orchestration.timetables makes
# manual runs infer the same interval), so a day has one logical date however it was run.


def arrival_day(logical_date) -> dt.date:
    """The arrival day of a billing_nightly run: the UTC day of its logical date."""
    if logical_date is None:
        raise ValueError(
            "billing_nightly needs a logical date: its UTC day is the arrival day it bills"
        )
    return day_of(logical_date)


def day_start(day: dt.date) -> dt.datetime:
    """00:00 UTC of ``day``: where its arrival interval starts."""
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def arrival_interval(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """Arrival day ``day`` as the run's data interval: [D 00:00, D+1 00:00) UTC."""
    start = day_start(day)
    return start, start + dt.timedelta(days=1)


def run_end(day: dt.date) -> dt.datetime:
    """The end of arrival day ``day``'s run: D+1 00:00 UTC (what ingest measures lateness from)."""
    return arrival_interval(day)[1]


def logical_date_of(day: dt.date, rerun: int = 0) -> dt.datetime:
    """The logical date of arrival day ``day``: D 00:00 UTC, as the scheduler and backfills use.

    ``rerun`` > 0 is ``billing run-day``'s n-th re-run of a day that already has a finished
    run: n seconds after midnight, still day D, so the earlier run and its history are kept
    (Airflow allows one run per logical date)."""
    if not 0 <= rerun < 86_400:
        raise ValueError(f"rerun must be in 0..86399, got {rerun}")
    return arrival_interval(day)[0] + dt.timedelta(seconds=rerun)


def arrival_run_id(run_type: str, day: dt.date, run_after: dt.datetime) -> str:
    """A run id that names the arrival day: ``scheduled__arrival-2026-11-03_<run after>``."""
    return f"{run_type}__arrival-{day.isoformat()}_{run_after.isoformat()}"


# ---------------------------------------------------------------- periods
# A billing period is a calendar month (UTC), named by its first day or written ``YYYY-MM``.
PERIOD_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"
OPTIONAL_PERIOD_PATTERN = rf"^$|{PERIOD_PATTERN}"  # a form field that may stay empty


def period_of(day: dt.date) -> dt.date:
    """The period ``day`` belongs to: the first day of its month."""
    return day.replace(day=1)


def month_end(period: dt.date) -> dt.date:
    """The last day of the month of ``period`` (any day of it)."""
    return period_of(period_of(period) + dt.timedelta(days=32)) - dt.timedelta(days=1)


def parse_period(text: str) -> dt.date:
    """The period written ``YYYY-MM`` (:data:`PERIOD_PATTERN`), as its first day."""
    if not isinstance(text, str) or not re.match(PERIOD_PATTERN, text):
        raise ValueError(f"invalid period {text!r}: expected YYYY-MM")
    return dt.date(int(text[:4]), int(text[5:7]), 1)


def period_close(period: dt.date) -> dt.datetime:
    """The first instant after ``period`` (any day of it): the run end of its last day,
    00:00 UTC on the first of the next month."""
    return run_end(month_end(period))


def period_from(value: str | dt.date | dt.datetime) -> dt.date:
    """The period of ``value``: ``YYYY-MM`` (:func:`parse_period`), a day ``YYYY-MM-DD``, a
    date, or an aware datetime (its UTC day; a naive one is taken as UTC)."""
    if isinstance(value, dt.datetime):
        return period_of(day_of(value) if value.tzinfo else value.date())
    if isinstance(value, dt.date):
        return period_of(value)
    if isinstance(value, str) and len(value) == 7:
        return parse_period(value)
    try:
        return period_of(dt.date.fromisoformat(value[:10]))
    except (TypeError, ValueError):
        raise ValueError(f"invalid period {value!r}: expected YYYY-MM") from None
