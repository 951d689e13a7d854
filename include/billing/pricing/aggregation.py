"""How a metric's events become the period-to-date quantity ``Q(d)`` that is priced.

Pure Python, the reference the dbt snapshot mirrors (``int_usage_period_to_date``;
docs/PRICING.md "Aggregations"). Every aggregation is computed over the billing period to
date, so ``C(d) = round_half_up(A(Q(d)))`` and the day's push ``C(d) - C(d-1)`` telescopes to
the invoice whatever the aggregation. Only billable events of the period are passed in.

* ``sum``: Σ quantity (the default).
* ``count``: the number of events.
* ``unique_count``: distinct non-null values of ``properties[<property>]``, compared as the
  text PostgreSQL's ``->>`` gives (a string as itself, ``7`` as ``"7"``, ``true`` as ``"true"``).
* ``max``: the largest quantity.
* ``latest``: the quantity of the last event by ``occurred_at``; ties go to the greatest
  ``event_id`` in byte order (PostgreSQL ``COLLATE "C"``). It can fall, so a day's charge can be negative.
* ``time_weighted``: each event's quantity holds from its ``occurred_at`` until the next
  event (or the end of the day being computed); quantity × hours, e.g. GB-hours::

      Q(d) = round_half_up(Σ_i v_i × µs(min(t_{i+1}, E_d) − t_i) / 3,600,000,000, 9 places)

  over the events with ``t_i < E_d = start of d+1 (UTC)``, ordered by ``(occurred_at,
  event_id)``. Nothing is held before the period's first event (no carry-over from the
  previous period). The one rounding is on the whole sum, half up, to 9 decimal places
  (``QUANTITY_DECIMALS``): exact integer arithmetic, never a float. ``Q(d)`` grows on days
  without events, so these metrics are charged every day from their first event on.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = [
    "AGGREGATIONS",
    "COUNT",
    "LATEST",
    "MAX",
    "SUM",
    "TIME_WEIGHTED",
    "UNIQUE_COUNT",
    "BillableEvent",
    "charge_days",
    "dimension_key",
    "event_dimension_key",
    "period_to_date",
    "property_text",
]

SUM = "sum"
COUNT = "count"
UNIQUE_COUNT = "unique_count"
MAX = "max"
LATEST = "latest"
TIME_WEIGHTED = "time_weighted"
AGGREGATIONS = (SUM, COUNT, UNIQUE_COUNT, MAX, LATEST, TIME_WEIGHTED)

#: Aggregations whose Q(d) never falls within a period (the snapshot's data test).
MONOTONIC = frozenset({SUM, COUNT, UNIQUE_COUNT, MAX, TIME_WEIGHTED})

_MICROS_PER_HOUR = 3_600_000_000
_NANO = 10**9  # QUANTITY_DECIMALS: event quantities have at most 9 decimal places


@dataclass(frozen=True)
class BillableEvent:
    """One billable usage event, as the aggregations see it."""

    event_id: str
    occurred_at: dt.datetime
    quantity: Decimal
    properties: Mapping[str, Any] | None = None

    @property
    def day(self) -> dt.date:
        return self.occurred_at.astimezone(dt.UTC).date()


def property_text(properties: Mapping[str, Any] | None, name: str) -> str | None:
    """``properties ->> name`` as PostgreSQL gives it; None when absent or JSON null."""
    if not properties:
        return None
    value = properties.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, separators=(", ", ": "), sort_keys=True)


def dimension_key(values: Sequence[str | None]) -> str:
    """The key of one combination of dimension values, in the metric's dimension order: the
    JSON array text PostgreSQL's ``jsonb_build_array(...)::text`` gives, e.g.
    ``["gpt-4o", "input"]`` (``null`` for a missing property); ``""`` without dimensions."""
    if not values:
        return ""
    return json.dumps(list(values), ensure_ascii=False)


def event_dimension_key(dimensions: Sequence[str], properties: Mapping[str, Any] | None) -> str:
    """The dimension key of one event of a metric with these ``dimensions``."""
    return dimension_key([property_text(properties, d) for d in dimensions])


def charge_days(
    aggregation: str,
    event_days: Iterable[dt.date],
    period_end: dt.date,
    run_day: dt.date,
    segment: tuple[dt.date, dt.date] | None = None,
) -> list[dt.date]:
    """The days of one period that carry a ``C(d)`` row: the days with events, and for a
    time-weighted metric every day from its first event through the period's end, or
    through the later of ``run_day`` and the last event day while the period is open; cut
    to a subscription ``segment`` ``[first day, day after its last)`` when given (for a
    time-weighted metric ``event_days`` are the period's, so a held value carries in)."""
    days = sorted(set(event_days))
    lo, hi = segment or (dt.date.min, dt.date.max)
    if aggregation != TIME_WEIGHTED or not days:
        return [d for d in days if lo <= d < hi]
    first = max(days[0], lo)
    through = min(period_end, max(run_day, days[-1]), hi - dt.timedelta(days=1))
    return [first + dt.timedelta(days=k) for k in range((through - first).days + 1)]


def period_to_date(
    aggregation: str,
    events: Iterable[BillableEvent],
    days: Sequence[dt.date],
    prop: str | None = None,
    since: dt.date | None = None,
) -> list[Decimal]:
    """``[Q(d) for d in days]``: the aggregate of the events on or before each day; a
    time-weighted quantity counts from the first instant of ``since`` (a segment's first
    day) when given, the value held then included."""
    ordered = sorted(events, key=lambda e: (e.occurred_at, e.event_id))
    return [_aggregate(aggregation, ordered, d, prop, since) for d in days]


def _aggregate(
    aggregation: str,
    ordered: list[BillableEvent],
    day: dt.date,
    prop: str | None,
    since: dt.date | None = None,
) -> Decimal:
    upto = [e for e in ordered if e.day <= day]
    if aggregation == SUM:
        return sum((e.quantity for e in upto), Decimal(0))
    if aggregation == COUNT:
        return Decimal(len(upto))
    if aggregation == UNIQUE_COUNT:
        if prop is None:
            raise ValueError("unique_count needs a property")
        values = {property_text(e.properties, prop) for e in upto} - {None}
        return Decimal(len(values))
    if aggregation == MAX:
        return max((e.quantity for e in upto), default=Decimal(0))
    if aggregation == LATEST:
        return upto[-1].quantity if upto else Decimal(0)
    if aggregation == TIME_WEIGHTED:
        return _time_weighted(upto, day, since)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def _micros(delta: dt.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _time_weighted(upto: list[BillableEvent], day: dt.date, since: dt.date | None) -> Decimal:
    horizon = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    start = None if since is None else dt.datetime.combine(since, dt.time(), dt.UTC)
    scaled = 0  # Σ v_i × 10^9 × µs_i, an exact integer
    for event, nxt in zip(upto, [*upto[1:], None], strict=True):
        end = horizon if nxt is None else min(nxt.occurred_at, horizon)
        begin = event.occurred_at if start is None else max(event.occurred_at, start)
        if end <= begin:
            continue
        nano = event.quantity.scaleb(9)
        if nano != nano.to_integral_value():
            raise ValueError(f"event {event.event_id}: more than 9 decimal places")
        scaled += int(nano) * _micros(end - begin)
    # round half up of scaled / 3.6e9 to an integer count of 10^-9 units, exactly
    nanos = (2 * scaled + _MICROS_PER_HOUR) // (2 * _MICROS_PER_HOUR)
    return Decimal(nanos).scaleb(-9)
