"""Text a person reads: aligned tables, money with its currency, exact numbers.

JSON output stays machine-shaped (integer minor units); these helpers are only for
``--format table`` and the other human-facing prints of the CLI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from billing.platform.errors import ConfigError


def money(minor: int | None, currency: str | None) -> str:
    """``98561, "eur"`` -> ``"€985.61"``; ``3600, "jpy"`` -> ``"¥3,600"``; unknown: ``"12 xyz"``."""
    from billing.pricing.catalog import format_money

    if minor is None:
        return "–"
    if not currency:
        return str(minor)
    try:
        return format_money(int(minor), currency.strip().lower())
    except ConfigError:  # a currency we don't price in still shows its raw amount
        return f"{minor} {currency}"


def number(value: Any) -> str:
    """An exact, readable cell: Decimals without artificial trailing zeros or exponents."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        text = format(value, "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | Decimal | float) and not isinstance(value, bool)


def render(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Iterable[str] = (),
    empty: str = "(no rows)",
) -> str:
    """An aligned plain-text table; numeric columns (or those named in ``right``) right-aligned."""
    rows = [list(r) for r in rows]
    if not rows:
        return "  ".join(columns) + "\n" + empty
    right_cols = set(right)
    for i, name in enumerate(columns):
        values = [r[i] for r in rows if r[i] is not None]
        if values and all(_numeric(v) for v in values):
            right_cols.add(name)
    cells = [[c if isinstance(c, str) else number(c) for c in r] for r in rows]
    widths = [max([len(name)] + [len(r[i]) for r in cells]) for i, name in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        out = [
            v.rjust(w) if name in right_cols else v.ljust(w)
            for v, w, name in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
