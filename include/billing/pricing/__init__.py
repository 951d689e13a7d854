"""Pricing: the catalog, the exact money rules and the catalog's copy in Postgres.

Playbook "Pricing". Pure Python rules that dbt, the Stripe sync and the PDFs mirror
(docs/PRICING.md).

* ``aggregation``: how a metric's events become the period-to-date quantity ``Q(d)``.
* ``catalog``: plans, metrics and tiers from ``include/config/catalog.yaml``; price, round, telescope.
* ``catalog_sync``: the catalog as versioned Postgres reference tables dbt prices with.
"""

from __future__ import annotations

from billing.pricing.aggregation import AGGREGATIONS, BillableEvent, charge_days, period_to_date
from billing.pricing.catalog import (
    CURRENCIES,
    MODES,
    Catalog,
    catalog_tables,
    catalog_version,
    charges,
    cumulative_charges,
    format_money,
    invoice_total,
    load_catalog,
    parse_catalog,
    price,
)

__all__ = [
    "AGGREGATIONS",
    "CURRENCIES",
    "Catalog",
    "BillableEvent",
    "MODES",
    "catalog_tables",
    "catalog_version",
    "charge_days",
    "charges",
    "cumulative_charges",
    "format_money",
    "invoice_total",
    "load_catalog",
    "parse_catalog",
    "period_to_date",
    "price",
]
