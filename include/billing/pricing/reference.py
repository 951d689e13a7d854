"""One org's period priced straight from its events: the Python reference of the snapshot.

``C(d)`` for each charge (a metric, or a metric and one combination of its dimension
values) from the metric's aggregation, the plan's price for the charge and the money rules
(docs/PRICING.md). A period is priced in subscription segments (docs/SUBSCRIPTIONS.md):
:func:`segments` cuts it by the org's plans over time and the catalog versions in force,
:func:`invoice_lines` prices each segment on its own, base fee and minimums prorated. The
dbt snapshot, the simulation and the cluster test are checked against it to the cent.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from billing.platform.dates import month_end
from billing.pricing import aggregation as agg
from billing.pricing.catalog import (
    MINIMUM_COMMITMENT,
    MINIMUM_SPEND,
    Catalog,
    Plan,
    charge_label,
    charges,
    to_minor,
    true_up_label,
)

__all__ = [
    "Segment",
    "invoice_lines",
    "period_charges",
    "period_total",
    "prorate",
    "segments",
    "true_ups",
]

_ALWAYS = dt.date.min  # "since always" / "open" ends of an interval
_NEVER = dt.date.max


@dataclass(frozen=True)
class Segment:
    """Days ``[start, end)`` of one period priced on one plan of one catalog version."""

    period: dt.date
    start: dt.date
    end: dt.date
    catalog: Catalog
    plan: Plan

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    @property
    def period_days(self) -> int:
        return (month_end(self.period) - self.period).days + 1

    @property
    def label_suffix(self) -> str:
        """``" from YYYY-MM-DD"`` for a segment that starts after the period's first day."""
        return "" if self.start == self.period else f" from {self.start.isoformat()}"


def prorate(amount_minor: int, days: int, period_days: int) -> int:
    """``round_half_up(amount × days / period_days)`` in minor units, exactly."""
    if days == period_days:
        return amount_minor
    return (2 * amount_minor * days + period_days) // (2 * period_days)


def segments(
    subscriptions: Sequence[tuple[str, dt.date | None, dt.date | None]],
    activations: Sequence[tuple[Catalog, dt.date | None]],
    period: dt.date,
) -> list[Segment]:
    """The ``period`` cut by ``subscriptions`` (``(plan, starts, ends)``, ``[starts, ends)``,
    None for since always / open; back-to-back intervals on one plan are one) and by the
    catalog ``activations`` (``(catalog,
    effective_from)`` oldest first; None: since always): each makes its catalog the one from
    its date on, replacing the older ones from that day."""
    versions = []
    for i, (catalog, since) in enumerate(activations):
        until = min((d or _ALWAYS for _, d in activations[i + 1 :]), default=_NEVER)
        if (since or _ALWAYS) < until:
            versions.append((catalog, since or _ALWAYS, until))
    nxt = month_end(period) + dt.timedelta(days=1)
    merged: list[list] = []  # back to back on the same plan: one interval
    for plan, starts, ends in sorted(subscriptions, key=lambda s: s[1] or _ALWAYS):
        if (
            merged
            and merged[-1][0] == plan
            and merged[-1][2] is not None
            and merged[-1][2] == starts
        ):
            merged[-1][2] = ends
        else:
            merged.append([plan, starts, ends])
    out = []
    for plan, starts, ends in merged:
        for catalog, v_from, v_until in versions:
            lo = max(period, starts or _ALWAYS, v_from)
            hi = min(nxt, ends or _NEVER, v_until)
            if lo < hi:
                out.append(Segment(period, lo, hi, catalog, catalog.plan(plan)))
    return sorted(out, key=lambda g: g.start)


def period_charges(
    catalog: Catalog,
    plan: Plan,
    events: Iterable[tuple[str, agg.BillableEvent]],
    period: dt.date,
    run_day: dt.date,
    segment: Segment | None = None,
    subscribed: Sequence[Segment] = (),
) -> dict[tuple[str, str], list[tuple[dt.date, int]]]:
    """``{(metric, dimension key): [(day, C(day)), ...]}`` for the billable ``events``
    (``(metric, event)`` pairs) of one org in ``period``, as the snapshot has them on
    ``run_day`` (a time-weighted charge has a row per day, see ``aggregation.charge_days``).
    With a ``segment``: its days only, priced from zero, except that a time-weighted value
    held when it starts (from an event of any of the ``subscribed`` segments) carries in."""
    inside = (segment.start, segment.end) if segment else (dt.date.min, dt.date.max)
    covered = [(g.start, g.end) for g in subscribed] or [inside]
    series: dict[tuple[str, str], list[agg.BillableEvent]] = defaultdict(list)
    for metric, event in events:
        if event.day.replace(day=1) != period:
            continue
        if not any(lo <= event.day < hi for lo, hi in covered):
            continue  # a day no subscription covers is not billed
        spec = catalog.metrics.get(metric)
        dims = spec.dimensions if spec is not None else ()
        series[(metric, agg.event_dimension_key(dims, event.properties))].append(event)
    out: dict[tuple[str, str], list[tuple[dt.date, int]]] = {}
    for (metric, key), found in sorted(series.items()):
        spec = catalog.metrics.get(metric)
        aggregation = spec.aggregation if spec is not None else agg.SUM
        if aggregation != agg.TIME_WEIGHTED:
            found = [e for e in found if inside[0] <= e.day < inside[1]]
        days = agg.charge_days(
            aggregation,
            [e.day for e in found],
            month_end(period),
            run_day,
            inside if segment else None,
        )
        if not days:
            continue
        quantities = agg.period_to_date(
            aggregation,
            found,
            days,
            spec.property if spec else None,
            since=segment.start if segment else None,
        )
        out[(metric, key)] = list(
            zip(days, charges(plan.price_for(metric, key), plan.currency, quantities), strict=True)
        )
    return out


def true_ups(
    plan: Plan,
    series: dict[tuple[str, str], list[tuple[dt.date, int]]],
    period: dt.date,
    run_day: dt.date,
    share: tuple[int, int] | None = None,
) -> dict[str, int]:
    """``{label: minor units}``: the period's true-up lines (docs/PRICING.md "Minimum spend
    and commitment"). None until the run of the period's last day (``run_day`` before its
    end): the usage may still reach the minimum. Then each metric's ``min_spend`` shortfall (a metric
    without dimensions, used or not), and the plan's ``minimum_commitment`` shortfall of the
    usage charges plus those true-ups; only the positive ones."""
    if run_day < month_end(period):
        return {}
    days, period_days = share or (1, 1)
    usage = {m: rows[-1][1] for (m, key), rows in series.items() if rows and not key}
    out: dict[str, int] = {}
    for metric in sorted(plan.metrics):
        mp = plan.metrics[metric]
        if mp.min_spend is not None:
            minimum = prorate(to_minor(mp.min_spend, plan.currency), days, period_days)
            short = minimum - usage.get(metric, 0)
            if short > 0:
                out[true_up_label(MINIMUM_SPEND, metric)] = short
    if plan.minimum_commitment is not None:
        spent = sum(rows[-1][1] for rows in series.values() if rows) + sum(out.values())
        commitment = to_minor(plan.minimum_commitment, plan.currency)
        short = prorate(commitment, days, period_days) - spent
        if short > 0:
            out[true_up_label(MINIMUM_COMMITMENT)] = short
    return out


def period_total(
    catalog: Catalog,
    plan: Plan,
    events: Iterable[tuple[str, agg.BillableEvent]],
    period: dt.date,
    run_day: dt.date,
) -> int:
    """The invoice total in minor units: the base fee, each charge's ``C(last day)`` and the
    true-ups."""
    series = period_charges(catalog, plan, events, period, run_day)
    usage = sum(rows[-1][1] for rows in series.values() if rows)
    return plan.base_fee_minor + usage + sum(true_ups(plan, series, period, run_day).values())


def invoice_lines(
    periods_segments: Sequence[Segment],
    events: Iterable[tuple[str, agg.BillableEvent]],
    run_day: dt.date,
) -> dict[str, int]:
    """``{charge label: minor units}`` of one org's invoice for the period of
    ``periods_segments`` (all of one period, from :func:`segments`): per segment its
    prorated base fee (``base_fee``), each charge's ``C(last day)`` and its true-ups, the
    labels carrying the segment's ``" from YYYY-MM-DD"``. Lines of 0 are left out."""
    events = list(events)
    out: dict[str, int] = {}
    for g in periods_segments:
        series = period_charges(
            g.catalog, g.plan, events, g.period, run_day, segment=g, subscribed=periods_segments
        )
        lines = {"base_fee": prorate(g.plan.base_fee_minor, g.days, g.period_days)}
        for (metric, key), rows in series.items():
            lines[charge_label(metric, key)] = rows[-1][1]
        lines |= true_ups(g.plan, series, g.period, run_day, (g.days, g.period_days))
        for label, cents in lines.items():
            if cents:
                out[label + g.label_suffix] = cents
    return out
