"""The Postgres outbox: every intended Stripe write is a row here before any HTTP call.

Rows are keyed by their idempotency key (also the SDK's key and a metadata field on the
Stripe object), so planning twice inserts nothing twice. Status moves
``pending -> sent`` or ``pending -> parked -> pending (manual retry) -> sent``; counters
(attempts, retries, per-class error counts) are columns, so they survive the short-lived
task process and can be exported.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# billing.stripe_outbox.status (migration 0010): the labels of billing_stripe_outbox_rows.
STATUSES = ("pending", "sent", "parked", "cancelled")

COLUMNS = (
    "outbox_id, idempotency_key, kind, org_id, period, day, metric, amount_cents, currency, "
    "payload, status, attempts, retries, error_counts, last_error, last_error_class, "
    "stripe_object_id, is_adopted, created_at, first_attempt_at, sent_at, parked_at"
)


@dataclass(frozen=True)
class Write:
    """One intended Stripe write, before it has an outbox id."""

    idempotency_key: str
    kind: str
    org_id: str
    period: dt.date
    payload: dict[str, Any]
    day: dt.date | None = None
    metric: str | None = None
    amount_cents: int | None = None
    currency: str | None = None


def key_for(
    kind: str, org_id: str, period: dt.date, day: dt.date | None = None, metric: str | None = None
) -> str:
    """Idempotency key: stable per org + day (+ metric); readable in Stripe's dashboard.

    A dimensioned charge (``metric ["v1", "v2"]``) keys on the metric and a digest of its
    values, so the key stays short (Stripe takes at most 255 characters) whatever the values."""
    parts = ["billing", kind, org_id, period.strftime("%Y-%m")]
    if day is not None:
        parts.append(day.isoformat())
    if metric is not None:
        name, _, values = metric.partition(" ")
        digest = hashlib.sha256(values.encode()).hexdigest()[:16]
        parts.append(f"{name}.{digest}" if values else name)
    return ":".join(parts)


def enqueue(cx, writes: Iterable[Write]) -> list[str]:
    """Insert writes that are not there yet; return the keys actually inserted."""
    inserted = []
    with cx.cursor() as cur:
        for w in writes:
            row = cur.execute(
                """INSERT INTO billing.stripe_outbox
                       (idempotency_key, kind, org_id, period, day, metric, amount_cents, currency, payload)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (idempotency_key) DO NOTHING
                   RETURNING idempotency_key""",
                (
                    w.idempotency_key,
                    w.kind,
                    w.org_id,
                    w.period,
                    w.day,
                    w.metric,
                    w.amount_cents,
                    w.currency,
                    Jsonb(w.payload),
                ),
            ).fetchone()
            if row:
                inserted.append(row[0])
    return inserted


def pending(
    cx, *, keys: Sequence[str] | None = None, ids: Sequence[int] | None = None
) -> list[dict]:
    """Pending rows in drain order (optionally only some)."""
    sql = f"SELECT {COLUMNS} FROM billing.stripe_outbox WHERE status = 'pending'"
    params: list[Any] = []
    if keys is not None:
        sql += " AND idempotency_key = ANY(%s)"
        params.append(list(keys))
    if ids is not None:
        sql += " AND outbox_id = ANY(%s)"
        params.append(list(ids))
    with cx.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql + " ORDER BY outbox_id", params).fetchall()


def get(cx, key: str) -> dict | None:
    with cx.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM billing.stripe_outbox WHERE idempotency_key = %s", (key,)
        ).fetchone()


def parked(cx) -> list[dict]:
    """Every parked row (the source of truth for ``billing parked``), oldest parking first."""
    with cx.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"""SELECT {COLUMNS} FROM billing.stripe_outbox WHERE status = 'parked'
                 ORDER BY parked_at, outbox_id"""
        ).fetchall()


def settled(cx, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` with nothing left to retry: sent, cancelled, or no outbox row."""
    keys = list(keys)
    if not keys:
        return set()
    open_ = {
        k
        for (k,) in cx.execute(
            """SELECT idempotency_key FROM billing.stripe_outbox
                WHERE idempotency_key = ANY(%s) AND status IN ('pending', 'parked')""",
            (keys,),
        ).fetchall()
    }
    return set(keys) - open_


def mark_attempting(cx, ids: Sequence[int]) -> None:
    cx.execute(
        """UPDATE billing.stripe_outbox SET first_attempt_at = coalesce(first_attempt_at, now()),
                  updated_at = now() WHERE outbox_id = ANY(%s)""",
        (list(ids),),
    )


def record_failure(cx, outbox_id: int, error_class: str, message: str, will_retry: bool) -> None:
    cx.execute(
        """UPDATE billing.stripe_outbox
              SET attempts = attempts + 1,
                  retries = retries + %s,
                  error_counts = jsonb_set(error_counts, ARRAY[%s],
                                           to_jsonb(coalesce((error_counts->>%s)::int, 0) + 1)),
                  last_error = %s, last_error_class = %s, updated_at = now()
            WHERE outbox_id = %s""",
        (1 if will_retry else 0, error_class, error_class, message, error_class, outbox_id),
    )


def mark_sent(
    cx, outbox_id: int, stripe_object_id: str, *, adopted: bool = False, attempted: bool = True
) -> None:
    cx.execute(
        """UPDATE billing.stripe_outbox
              SET status = 'sent', stripe_object_id = %s, is_adopted = %s,
                  attempts = attempts + %s, sent_at = now(), updated_at = now(), parked_at = NULL
            WHERE outbox_id = %s""",
        (stripe_object_id, adopted, 1 if attempted else 0, outbox_id),
    )


def mark_parked(cx, outbox_id: int) -> None:
    cx.execute(
        """UPDATE billing.stripe_outbox SET status = 'parked', parked_at = now(), updated_at = now()
            WHERE outbox_id = %s""",
        (outbox_id,),
    )


def requeue(cx, keys: Sequence[str] | None) -> list[int]:
    """Move parked rows (all when ``keys`` is None) back to pending; return their ids."""
    sql = "UPDATE billing.stripe_outbox SET status = 'pending', updated_at = now() WHERE status = 'parked'"
    params: list[Any] = []
    if keys is not None:
        sql += " AND idempotency_key = ANY(%s)"
        params.append(list(keys))
    return [r[0] for r in cx.execute(sql + " RETURNING outbox_id", params).fetchall()]


def counts(cx) -> dict[str, int]:
    rows = cx.execute(
        "SELECT status, count(*) FROM billing.stripe_outbox GROUP BY status"
    ).fetchall()
    return {status: n for status, n in rows}


def counters(cx) -> dict[str, Any]:
    """Durable counters for export: attempts, successes, retries, parked, errors by class."""
    row = cx.execute(
        """SELECT coalesce(sum(attempts), 0), count(*) FILTER (WHERE status = 'sent'),
                  coalesce(sum(retries), 0), count(*) FILTER (WHERE status = 'parked'),
                  count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE is_adopted)
             FROM billing.stripe_outbox"""
    ).fetchone()
    errors = dict(
        cx.execute(
            """SELECT e.key, sum(e.value::int) FROM billing.stripe_outbox o,
                      jsonb_each_text(o.error_counts) e GROUP BY e.key ORDER BY e.key"""
        ).fetchall()
    )
    return {
        "attempts": int(row[0]),
        "successes": row[1],
        "retries": int(row[2]),
        "parked": row[3],
        "queued": row[4],
        "adopted": row[5],
        "errors_by_class": {k: int(v) for k, v in errors.items()},
    }
