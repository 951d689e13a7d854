"""Pricing: the catalog, the exact money rules and the catalog's copy in Postgres.

Playbook "Pricing". Pure Python rules that dbt, the Stripe sync and the PDFs mirror
(docs/PRICING.md).

* ``catalog``: plans, metrics and tiers from ``include/config/catalog.yaml``; price, round, telescope.
* ``catalog_sync``: the catalog as versioned Postgres reference tables dbt prices with.
"""

from __future__ import annotations

from billing.pricing.catalog import (
    CURRENCIES,
    MODES,
    Catalog,
    catalog_tables,
    catalog_version,
    cumulative_charges,
    format_money,
    invoice_total,
    load_catalog,
    parse_catalog,
    price,
)

__all__ = [
    "CURRENCIES",
    "Catalog",
    "MODES",
    "catalog_tables",
    "catalog_version",
    "cumulative_charges",
    "format_money",
    "invoice_total",
    "load_catalog",
    "parse_catalog",
    "price",
]
