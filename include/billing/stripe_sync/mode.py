"""Stripe outage (read-only) mode: one row in ``billing.stripe_read_only`` while it is on.

The flag lives in Postgres (migration 0070), not only in Redis: a Redis FLUSHALL or a
restart without persistence must never switch outage mode off behind on-call's back.
Every reader (the drain, ``billing stripe read-only status``, the Billing page and the
``billing_stripe_read_only`` gauge) reads this table; there is no Redis copy.
"""

from __future__ import annotations

import datetime as dt

from billing.platform import db

TABLE = "billing.stripe_read_only"


def info(cx=None) -> dict | None:
    """``{"since": ISO time, "reason": ...}`` while read-only is on, else None."""
    if cx is None:
        with db.connect(autocommit=True) as own:
            return info(own)
    row = cx.execute(f"SELECT since, reason FROM {TABLE} WHERE singleton").fetchone()
    if row is None:
        return None
    since: dt.datetime = row[0]
    return {"since": since.astimezone(dt.UTC).isoformat(), "reason": row[1]}


def is_on(cx=None) -> bool:
    return info(cx) is not None


def set_mode(on: bool, reason: str = "", cx=None) -> None:
    """Switch read-only on (keeping the first ``since`` of an ongoing outage) or off."""
    if cx is None:
        with db.connect(autocommit=True) as own:
            return set_mode(on, reason, own)
    if on:
        cx.execute(
            f"""INSERT INTO {TABLE} (singleton, reason) VALUES (true, %s)
                ON CONFLICT (singleton) DO UPDATE SET reason = EXCLUDED.reason, updated_at = now()""",
            (reason,),
        )
    else:
        cx.execute(f"DELETE FROM {TABLE}")
    return None
