"""What the invoice snapshot (dbt, Postgres) says we should have charged: the only reads
the push makes of it, so the relation names live in one place.

``settings.snapshot_schema()`` names the published schema holding ``fct_daily_charges`` and
``fct_invoices``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg import sql

from billing.platform import settings


def _rel(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(settings.snapshot_schema()), sql.Identifier(name))


@dataclass(frozen=True)
class Cumulative:
    org_id: str
    metric: str  # the charge label: the metric, plus its dimension key when it has one
    currency: str
    cumulative_charge_cents: int  # C_now(day): recomputed with every event known now


@dataclass(frozen=True)
class BaseFee:
    org_id: str
    currency: str
    plan: str
    base_fee_cents: int


def cumulative_through(cx, period: dt.date, day: dt.date) -> list[Cumulative]:
    """C_now(day) per org and charge: the latest usage day's cumulative charge up to ``day``.
    A charge is a metric, or a metric and one combination of its dimension values, in one
    subscription segment (the snapshot's ``charge_label``: ``ai_tokens ["gpt-4o", "input"]``,
    ``api_calls from 2026-03-15``)."""
    q = sql.SQL(
        """SELECT DISTINCT ON (org_id, charge_label) org_id, charge_label,
                  lower(currency), cumulative_charge_cents
             FROM {t}
            WHERE period_start = %s AND usage_date <= %s
            ORDER BY org_id, charge_label, usage_date DESC"""
    ).format(t=_rel("fct_daily_charges"))
    return [Cumulative(*r) for r in cx.execute(q, (period, day)).fetchall()]


def true_ups(cx, period: dt.date) -> list[Cumulative]:
    """The period's true-up lines (minimum spend, commitment) per org, labelled as their
    Stripe items are (``minimum_spend.<metric>``, ``minimum_commitment``, plus a later
    segment's `` from YYYY-MM-DD``)."""
    q = sql.SQL(
        """SELECT org_id, charge_label, lower(currency), amount_cents
             FROM {t}
            WHERE period_start = %s AND line_type IN ('minimum_spend', 'minimum_commitment')
            ORDER BY 1, 2"""
    ).format(t=_rel("fct_invoice_lines"))
    return [Cumulative(*r) for r in cx.execute(q, (period,)).fetchall()]


def base_fees(cx, period: dt.date) -> list[BaseFee]:
    """The base fee of every org the snapshot invoices for ``period``."""
    q = sql.SQL(
        """SELECT org_id, lower(currency), plan, base_fee_cents FROM {t}
            WHERE period_start = %s ORDER BY org_id"""
    ).format(t=_rel("fct_invoices"))
    return [BaseFee(*r) for r in cx.execute(q, (period,)).fetchall()]


def invoice_totals(cx, period: dt.date) -> dict[str, int]:
    """total_cents per org for ``period`` (what Stripe's items must add up to)."""
    q = sql.SQL("SELECT org_id, total_cents FROM {t} WHERE period_start = %s").format(
        t=_rel("fct_invoices")
    )
    return dict(cx.execute(q, (period,)).fetchall())
