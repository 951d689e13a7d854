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

from billing.pricing import aggregation as agg
from billing.pricing.catalog import Catalog, Plan, charges

__all__ = ["period_charges", "period_total"]


def _period_end(period: dt.date) -> dt.date:
    return (period.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)


def period_charges(
    catalog: Catalog,
    plan: Plan,
    events: Iterable[tuple[str, agg.Event]],
    period: dt.date,
    run_day: dt.date,
) -> dict[tuple[str, str], list[tuple[dt.date, int]]]:
    """``{(metric, dimension key): [(day, C(day)), ...]}`` for the billable ``events``
    (``(metric, event)`` pairs) of one org in ``period``, as the snapshot has them on
    ``run_day`` (a time-weighted charge has a row per day, see ``aggregation.charge_days``)."""
    series: dict[tuple[str, str], list[agg.Event]] = defaultdict(list)
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
        days = agg.charge_days(aggregation, [e.day for e in found], _period_end(period), run_day)
        quantities = agg.period_to_date(aggregation, found, days, spec.property if spec else None)
        out[(metric, key)] = list(
            zip(days, charges(plan.price_for(metric, key), plan.currency, quantities), strict=True)
        )
    return out


def period_total(
    catalog: Catalog,
    plan: Plan,
    events: Iterable[tuple[str, agg.Event]],
    period: dt.date,
    run_day: dt.date,
) -> int:
    """The invoice total in minor units: the base fee plus each charge's ``C(last day)``."""
    series = period_charges(catalog, plan, events, period, run_day)
    return plan.base_fee_minor + sum(rows[-1][1] for rows in series.values() if rows)
