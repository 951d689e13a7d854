"""Load the pricing catalog into Postgres reference tables that dbt prices with.

The rows come from :func:`billing.pricing.catalog.catalog_tables`, keyed by
:func:`billing.pricing.catalog.catalog_version`: a version is content-addressed, so it is written
once and only the ``is_current`` flag moves. Safe to call on every run.
"""

from __future__ import annotations

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


def current_version(cx) -> str | None:
    row = cx.execute(
        "SELECT catalog_version FROM billing.catalog_versions WHERE is_current"
    ).fetchone()
    return row[0] if row else None
