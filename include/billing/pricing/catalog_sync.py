"""Load the pricing catalog into Postgres reference tables that dbt prices with.

The rows come from :func:`billing.pricing.catalog.catalog_tables`, keyed by
:func:`billing.pricing.catalog.catalog_version`: a version is content-addressed, so it is written
once and only the ``is_current`` flag moves. Safe to call on every run.

Each activation makes its version the catalog from its ``effective_from`` on, replacing the
older activations from that day (docs/SUBSCRIPTIONS.md "Catalog versions"): the catalog's
own ``effective_from``, else the first day no closed period covers (since always before any
month closed). A closed period is never re-priced by a later catalog: a date inside one is
refused.
"""

from __future__ import annotations

import datetime as dt

from billing.platform.dates import month_end
from billing.platform.errors import ConfigError
from billing.pricing import catalog as pricing

SYNC_LOCK = 7_203_003  # advisory lock key: one sync at a time


def sync(cx, catalog: pricing.Catalog) -> str:
    """Make ``catalog`` the current version in ``billing.catalog_*``; return its version.

    Runs in the caller's transaction (or its own, on an autocommit connection).
    """
    version = pricing.catalog_version(catalog)
    tables = pricing.catalog_tables(catalog)
    with cx.transaction(), cx.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SYNC_LOCK,))
        cur.execute(
            "INSERT INTO billing.catalog_versions (catalog_version) VALUES (%s) "
            "ON CONFLICT DO NOTHING RETURNING catalog_version",
            (version,),
        )
        if cur.fetchone() is not None:
            cur.executemany(
                "INSERT INTO billing.catalog_metrics (catalog_version, metric, unit, description,"
                " aggregation, property, dimensions) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(version, *row) for row in tables["metrics"]],
            )
            cur.executemany(
                "INSERT INTO billing.catalog_plans (catalog_version, plan, currency, base_fee,"
                " base_fee_cents, minor_exponent, minimum_commitment_cents)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(version, *row) for row in tables["plans"]],
            )
            cur.executemany(
                "INSERT INTO billing.catalog_plan_metrics (catalog_version, plan, metric,"
                " price_key, mode, package_size, package_price, rounding, free_units, max_spend,"
                " min_spend_cents) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(version, *row) for row in tables["plan_metrics"]],
            )
            cur.executemany(
                "INSERT INTO billing.catalog_plan_tiers (catalog_version, plan, metric, price_key,"
                " tier_index, lower_bound, up_to, unit_price, block_size, block_price, flat_amount)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(version, *row) for row in tables["plan_tiers"]],
            )
        _activate(cur, version, catalog.effective_from)
        cur.execute(
            "UPDATE billing.catalog_versions SET is_current = false "
            "WHERE is_current AND catalog_version <> %s",
            (version,),
        )
        cur.execute(
            "UPDATE billing.catalog_versions SET is_current = true "
            "WHERE catalog_version = %s AND NOT is_current",
            (version,),
        )
    return version


def _first_open_day(cur) -> dt.date | None:
    """The day after the last closed period, or None when no period has closed."""
    cur.execute("SELECT max(period) FROM billing.period_closes")
    (last,) = cur.fetchone()
    return None if last is None else month_end(last) + dt.timedelta(days=1)


def _activate(cur, version: str, effective_from: dt.date | None) -> None:
    """Put ``version`` in force from ``effective_from`` unless the newest activation is it."""
    cur.execute(
        "SELECT catalog_version FROM billing.catalog_activations "
        "ORDER BY activation_id DESC LIMIT 1"
    )
    newest = cur.fetchone()
    if newest is not None and newest[0] == version:
        return
    first_open = _first_open_day(cur)
    if effective_from is not None and first_open is not None and effective_from < first_open:
        raise ConfigError(
            f"catalog effective_from {effective_from.isoformat()} falls in a closed period "
            f"(closed through {(first_open - dt.timedelta(days=1)).isoformat()}): a finalized "
            f"period is never re-priced; use {first_open.isoformat()} or later "
            "(corrections of a closed period: billing rerate)"
        )
    day = effective_from or first_open or dt.date.min
    cur.execute(
        "INSERT INTO billing.catalog_activations (catalog_version, effective_from) VALUES (%s, %s)",
        (version, "-infinity" if day == dt.date.min else day),
    )


def activations(cx) -> list[tuple[str, dt.date | None, dt.datetime]]:
    """``(catalog_version, effective_from or None for since always, activated_at)``, oldest
    first: which catalog priced which days."""
    rows = cx.execute(
        "SELECT catalog_version, effective_from::text, activated_at FROM "
        "billing.catalog_activations ORDER BY activation_id"
    ).fetchall()
    return [(v, None if d == "-infinity" else dt.date.fromisoformat(d), at) for v, d, at in rows]


def current_version(cx) -> str | None:
    row = cx.execute(
        "SELECT catalog_version FROM billing.catalog_versions WHERE is_current"
    ).fetchone()
    return row[0] if row else None
