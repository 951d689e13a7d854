"""One org's period priced straight from its events: the Python reference of the snapshot.

``C(d)`` for each charge (a metric, or a metric and one combination of its dimension
values) from the metric's aggregation, the plan's price for the charge and the money rules
(docs/PRICING.md). The dbt snapshot, the simulation and the cluster test are checked
against it to the cent.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable

from billing.platform.dates import month_end
from billing.pricing import aggregation as agg
from billing.pricing.catalog import (
    MINIMUM_COMMITMENT,
    MINIMUM_SPEND,
    Catalog,
    Plan,
    charges,
    to_minor,
    true_up_label,
)

__all__ = ["period_charges", "period_total", "true_ups"]


def period_charges(
    catalog: Catalog,
    plan: Plan,
    events: Iterable[tuple[str, agg.BillableEvent]],
    period: dt.date,
    run_day: dt.date,
) -> dict[tuple[str, str], list[tuple[dt.date, int]]]:
    """``{(metric, dimension key): [(day, C(day)), ...]}`` for the billable ``events``
    (``(metric, event)`` pairs) of one org in ``period``, as the snapshot has them on
    ``run_day`` (a time-weighted charge has a row per day, see ``aggregation.charge_days``)."""
    series: dict[tuple[str, str], list[agg.BillableEvent]] = defaultdict(list)
    for metric, event in events:
        if event.day.replace(day=1) != period:
            continue
        spec = catalog.metrics.get(metric)
        dims = spec.dimensions if spec is not None else ()
        series[(metric, agg.event_dimension_key(dims, event.properties))].append(event)
    out: dict[tuple[str, str], list[tuple[dt.date, int]]] = {}
    for (metric, key), found in sorted(series.items()):
        spec = catalog.metrics.get(metric)
        aggregation = spec.aggregation if spec is not None else agg.SUM
        days = agg.charge_days(aggregation, [e.day for e in found], month_end(period), run_day)
        quantities = agg.period_to_date(aggregation, found, days, spec.property if spec else None)
        out[(metric, key)] = list(
            zip(days, charges(plan.price_for(metric, key), plan.currency, quantities), strict=True)
        )
    return out


def true_ups(
    plan: Plan,
    series: dict[tuple[str, str], list[tuple[dt.date, int]]],
    period: dt.date,
    run_day: dt.date,
) -> dict[str, int]:
    """``{label: minor units}``: the period's true-up lines (docs/PRICING.md "Minimum spend
    and commitment"). None until the run of the period's last day (``run_day`` before its
    end): the usage may still reach the minimum. Then each metric's ``min_spend`` shortfall (a metric
    without dimensions, used or not), and the plan's ``minimum_commitment`` shortfall of the
    usage charges plus those true-ups; only the positive ones."""
    if run_day < month_end(period):
        return {}
    usage = {m: rows[-1][1] for (m, key), rows in series.items() if rows and not key}
    out: dict[str, int] = {}
    for metric in sorted(plan.metrics):
        mp = plan.metrics[metric]
        if mp.min_spend is not None:
            short = to_minor(mp.min_spend, plan.currency) - usage.get(metric, 0)
            if short > 0:
                out[true_up_label(MINIMUM_SPEND, metric)] = short
    if plan.minimum_commitment is not None:
        spent = sum(rows[-1][1] for rows in series.values() if rows) + sum(out.values())
        short = to_minor(plan.minimum_commitment, plan.currency) - spent
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
