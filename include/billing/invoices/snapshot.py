"""Read the invoice snapshot (dbt's ``fct_invoices`` / ``fct_invoice_lines`` in Postgres).

The one reader for every consumer (CLI, PDFs, Stripe, dunning): amounts are integer minor
units, quantities and tier amounts exact Decimals (never floats).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from psycopg import sql

from billing.platform.dates import parse_period, period_of
from billing.platform.errors import ConfigError

# inv_<org_id>_<YYYYMM>; org_id as constrained in billing.organizations.
INVOICE_ID_PATTERN = r"^inv_[A-Za-z0-9_.-]{1,64}_[0-9]{6}$"
INVOICE_ID = re.compile(INVOICE_ID_PATTERN)

_INVOICE_COLUMNS = (
    "invoice_id, org_id, period, period_start, period_end, plan, currency, base_fee_cents, "
    "usage_cents, total_cents, status, catalog_version, snapshot_hash, as_of_day"
)


def schema() -> str:
    """The published snapshot's schema (``settings.snapshot_schema``, the one place)."""
    from billing.platform import settings

    return settings.snapshot_schema()


def _rel(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema()), sql.Identifier(name))


@dataclass(frozen=True)
class Line:
    line_number: int
    line_type: str  # base_fee | usage
    metric: str | None
    pricing_mode: str | None
    quantity: Decimal
    amount_cents: int
    tiers: list[dict[str, Any]]
    aggregation: str | None = None  # how the metric's events became the quantity
    credited_cents: int = 0  # the negative daily charges netted in amount_cents (<= 0)
    credited_days: int = 0
    dimension_key: str = ""  # the combination of dimension values the line prices
    dimensions: dict[str, str | None] = field(default_factory=dict)
    # the subscription segment [segment_start, segment_end) the line belongs to, its plan
    # and the snapshot's charge label (docs/SUBSCRIPTIONS.md)
    segment_start: dt.date | None = None
    segment_end: dt.date | None = None
    plan: str | None = None
    charge_label: str = ""

    @property
    def charge(self) -> str:
        """The line's charge, as Stripe items name it (``metadata.metric``): the snapshot's
        charge label; every segment's base fee is the one ``base_fee`` charge (pushed as the
        period's total)."""
        if self.line_type == "base_fee":
            return "base_fee"
        return self.charge_label


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    org_id: str
    period: str  # YYYY-MM
    period_start: dt.date
    period_end: dt.date
    plan: str
    currency: str
    base_fee_cents: int
    usage_cents: int
    total_cents: int
    status: str  # draft | final
    catalog_version: str
    snapshot_hash: str  # changes with any visible content: use as ETag
    as_of_day: dt.date
    lines: list[Line] = field(default_factory=list)

    @property
    def usage_lines(self) -> list[Line]:
        return [line for line in self.lines if line.line_type == "usage"]

    @property
    def charge_lines(self) -> list[Line]:
        """Every line but the base fee: usage, then the true-ups (minimum spend, commitment)."""
        return [line for line in self.lines if line.line_type != "base_fee"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dates as ISO strings, Decimals as exact strings."""
        return _jsonable(asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _period(value: str | dt.date) -> dt.date:
    if isinstance(value, dt.date):
        return period_of(value)
    try:
        return parse_period(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _fetch(cx, where: sql.Composable, params: tuple) -> list[Invoice]:
    """Invoices and their lines in one statement: one MVCC snapshot, so the lines always
    belong to the invoice row they are returned with (the snapshot is published whole)."""
    cols = ", ".join(f"i.{c.strip()}" for c in _INVOICE_COLUMNS.split(","))
    q = sql.SQL(
        "SELECT {cols}, l.line_number, l.line_type, l.metric, l.pricing_mode, l.quantity,"
        " l.amount_cents, l.tiers::text, l.aggregation, l.credited_cents, l.credited_days,"
        " l.dimension_key, l.dimensions, l.segment_start, l.segment_end, l.plan,"
        " l.charge_label"
        " FROM (SELECT * FROM {inv} WHERE {where}) AS i"
        " LEFT JOIN {lines} AS l ON l.invoice_id = i.invoice_id"
        " ORDER BY i.org_id, i.period_start, l.line_number"
    ).format(
        cols=sql.SQL(cols), inv=_rel("fct_invoices"), lines=_rel("fct_invoice_lines"), where=where
    )
    try:
        rows = cx.execute(q, params).fetchall()
    except Exception as exc:  # psycopg.errors.UndefinedTable and friends
        if getattr(exc, "sqlstate", None) in ("42P01", "3F000"):
            cx.rollback()
            raise ConfigError(
                f"no invoice snapshot in schema {schema()!r} yet: run 'billing transform --day D'"
            ) from None
        raise
    n = len(_INVOICE_COLUMNS.split(","))
    heads: dict[str, tuple] = {}
    lines: dict[str, list[Line]] = {}
    for r in rows:
        head, (number, ltype, metric, mode, qty, cents, tiers, *credits) = r[:n], r[n:]
        heads.setdefault(head[0], head)
        if number is not None:
            lines.setdefault(head[0], []).append(
                Line(
                    number,
                    ltype,
                    metric,
                    mode,
                    qty,
                    cents,
                    json.loads(tiers, parse_float=Decimal),
                    *credits,
                )
            )
    return [Invoice(*h, lines=lines.get(i, [])) for i, h in heads.items()]


def list_invoices(cx, period: str | dt.date, org_id: str | None = None) -> list[Invoice]:
    """Invoices of ``period`` (``YYYY-MM`` or any date in it), optionally for one org."""
    start = _period(period)
    if org_id is None:
        return _fetch(cx, sql.SQL("period_start = %s"), (start,))
    return _fetch(cx, sql.SQL("period_start = %s AND org_id = %s"), (start, org_id))


def get_invoice(cx, invoice_id: str) -> Invoice | None:
    if not INVOICE_ID.match(invoice_id or ""):
        raise ConfigError(f"invalid invoice id {invoice_id!r}: expected inv_<org_id>_<YYYYMM>")
    found = _fetch(cx, sql.SQL("invoice_id = %s"), (invoice_id,))
    return found[0] if found else None


def summary(inv: Invoice) -> dict[str, Any]:
    """The fields the CLI prints: usage lines as {metric, quantity, amount_cents}."""
    return {
        "invoice_id": inv.invoice_id,
        "org_id": inv.org_id,
        "period": inv.period,
        "currency": inv.currency,
        "base_fee_cents": inv.base_fee_cents,
        "lines": [
            {
                "metric": x.metric,
                **({"dimensions": x.dimensions} if x.dimension_key else {}),
                "quantity": format(x.quantity, "f"),
                "amount_cents": x.amount_cents,
            }
            for x in inv.usage_lines
        ]
        + [
            {"true_up": x.charge, "amount_cents": x.amount_cents}
            for x in inv.charge_lines
            if x.line_type != "usage"
        ],
        "total_cents": inv.total_cents,
        "status": inv.status,
    }
