"""Stripe sync: exactly-once overage pushes through a Postgres outbox.

Playbook flow "Invoice lifecycle -> sync with Stripe (overages)" and the "Stripe API
errors" / "Stripe outage" failure modes. The nightly DAG calls :func:`push_day` after dbt,
then :func:`close_due` (each month whose close is due, :mod:`closing`); :func:`sync_invoices` runs daily for dunning. The
``billing parked ...`` / ``billing stripe ...`` commands and the ``billing_retry_parked``
DAG are thin shells over the functions here.

* ``outbox``: every write is a row (idempotency key, payload, status, counters) before any
  HTTP call; the same key goes to the SDK and into the object's metadata.
* ``client``: SDK client from ``stripe_default``, retry policy 1/2/4/8/16 s, rate limit.
* ``engine``: drains the outbox per org, parks failures (outbox + Redis copy), and before
  re-sending a write an earlier drain tried, adopts it if Stripe already has it.
* ``parking``: the Redis side (the parked writes' copy).
* ``mode``: the read-only (outage) flag, durable in Postgres.
* ``closing``: when a month closes (the rule) and the durable record of closes.
* ``delivery``: whether everything reached Stripe (the nightly sentinel, the Billing page).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence

from billing.platform import db
from billing.platform.dates import period_of
from billing.platform.errors import BillingError, ServiceError
from billing.stripe_sync import closing, mode, outbox, parking, push
from billing.stripe_sync.client import Gateway, Policy
from billing.stripe_sync.engine import Engine, upsert_invoice

__all__ = [
    "Engine",
    "Gateway",
    "Policy",
    "close_due",
    "close_period",
    "counters",
    "drain",
    "list_parked",
    "push_day",
    "read_only",
    "retry_parked",
    "set_read_only",
    "show_parked",
    "sync_invoices",
]

log = logging.getLogger(__name__)
Sleep = Callable[[float], None]


def _engine(engine: Engine | None, sleep: Sleep | None) -> Engine:
    return engine or Engine(sleep=sleep)


def push_day(day: dt.date, *, engine: Engine | None = None, sleep: Sleep | None = None) -> dict:
    """Plan run day ``day``'s writes into the outbox, then drain it (unless Stripe is read-only).

    Never fails for a write Stripe refuses: that write is parked for manual retry and
    counted in the summary. Fails (leaving rows queued) when the key is rejected.
    """
    from billing.transform import published_seq

    with db.transaction() as cx:
        cx.execute("SELECT pg_advisory_xact_lock(hashtext('billing.stripe_sync.plan'))")
        seq = published_seq(cx)  # the publish this push plans from
        writes = push.plan_day(cx, day)
        inserted = set(outbox.enqueue(cx, writes))
    planned = [w for w in writes if w.idempotency_key in inserted]
    amounts: dict[str, int] = {}
    for w in planned:
        if w.amount_cents is not None:
            amounts[w.currency] = amounts.get(w.currency, 0) + w.amount_cents
    eng = _engine(engine, sleep)
    result = eng.drain()
    summary = {
        "day": day.isoformat(),
        "period": period_of(day).strftime("%Y-%m"),
        "planned": len(planned),
        "planned_cents": amounts,
        "snapshot_seq": seq,
        **result,
    }
    log.info("stripe push %s: %s", day, summary)
    return summary


def drain(*, engine: Engine | None = None, sleep: Sleep | None = None) -> dict:
    """Send every queued write in order (after an outage or when items were blocked)."""
    return _engine(engine, sleep).drain()


def close_period(
    period: dt.date,
    *,
    engine: Engine | None = None,
    sleep: Sleep | None = None,
    closed_on_day: dt.date | None = None,
    missing_days: Sequence[dt.date] = (),
) -> dict:
    """Month end: one finalized Stripe invoice per org collecting the period's items (idempotent).

    Each invoice takes the org's items of the period (and earlier periods' late items)
    explicitly, never a later period's. Once every org with items has a finalized invoice
    the close is recorded in ``billing.period_closes`` (``closing``), which the nightly reads.
    """
    period = period_of(period)
    eng = _engine(engine, sleep)
    with db.transaction() as cx:
        cx.execute("SELECT pg_advisory_xact_lock(hashtext('billing.stripe_sync.plan'))")
        writes, blocked = push.plan_close(cx, period, eng.policy.days_until_due)
        inserted = outbox.enqueue(cx, writes)
    result = eng.drain()
    with db.transaction() as cx:
        invoices = dict(
            cx.execute(
                "SELECT org_id, stripe_invoice_id FROM billing.stripe_invoices WHERE period = %s",
                (period,),
            ).fetchall()
        )
        complete = closing.record_if_complete(cx, period, closed_on_day, list(missing_days))
    return {
        "period": period.strftime("%Y-%m"),
        "planned": len(inserted),
        "invoices": invoices,
        "closed": complete,
        **result,
        # After the drain's counts: these are the orgs whose invoice could not be created
        # yet (items still queued or parked), for on-call to see.
        "blocked": blocked,
    }


def close_due(
    day: dt.date, *, run_id: str | None = None, today: dt.date | None = None, **kwargs
) -> dict:
    """The nightly close step of arrival day ``day``: record the day, close every month due.

    The rule is in :mod:`billing.stripe_sync.closing`: a month closes in the first run that
    finds all its arrival days run (the last day's, or any run of a backfill), or else in
    the next month's first run; a missed or never-opened month is never left open.
    """
    today = today or dt.datetime.now(dt.UTC).date()
    with db.transaction() as cx:
        closing.record_day(cx, day, run_id)
        due = closing.due(cx, day, today)
    closes = []
    for period, missing in due:
        if missing:
            log.warning(
                "closing %s without arrival days %s (never run): their usage reaches "
                "Stripe as late items on the next invoice once they run",
                f"{period:%Y-%m}",
                ", ".join(d.isoformat() for d in missing),
            )
        closes.append(
            close_period(period, closed_on_day=day, missing_days=missing, **kwargs)
            | {"missing_days": [d.isoformat() for d in missing]}
        )
    if not closes:
        return {"day": day.isoformat(), "status": "skipped", "reason": "no month is due"}
    left_open = [c["period"] for c in closes if not c["closed"]]
    return {
        "day": day.isoformat(),
        "status": "open" if left_open else "closed",
        "closes": closes,
        **({"left_open": left_open} if left_open else {}),
    }


def sync_invoices(*, engine: Engine | None = None, sleep: Sleep | None = None) -> dict:
    """Copy each recorded invoice's Stripe status and amounts into billing.stripe_invoices.

    Reads only, so it runs in read-only mode too. Paid and void invoices are final and skipped.
    """
    eng = _engine(engine, sleep)
    with db.connect(autocommit=True) as cx:
        rows = cx.execute(
            """SELECT org_id, period, stripe_invoice_id FROM billing.stripe_invoices
                WHERE status NOT IN ('paid', 'void') ORDER BY period, org_id"""
        ).fetchall()
        statuses: dict[str, int] = {}
        failed = 0
        for org_id, period, invoice_id in rows:
            try:
                inv, _ = eng.gw.call(
                    "retrieve_invoice", lambda i=invoice_id: eng.gw.v1.invoices.retrieve(i)
                )
            except Exception as exc:  # one unreadable invoice must not stop the others
                log.warning("cannot sync invoice %s: %s", invoice_id, exc)
                failed += 1
                continue
            upsert_invoice(cx, org_id, period, inv)
            statuses[inv["status"]] = statuses.get(inv["status"], 0) + 1
    return {"synced": sum(statuses.values()), "failed": failed, "by_status": statuses}


# ------------------------------------------------------------------ parked writes
def list_parked() -> list[dict]:
    """Parked writes as the outbox records them, oldest parking first.

    The outbox is the source of truth; the Redis hash is its copy for manual retry. Reading
    the list also repairs that copy (:func:`parking.mirror`): entries Redis lost are written
    back, entries of writes sent since are dropped. Redis being down hides nothing here.
    """
    with db.connect() as cx:
        records = [parking.record(row) for row in outbox.parked(cx)]
        try:
            r = parking.client()
            extra = parking.keys(r) - {rec["idempotency_key"] for rec in records}
            mirrored = parking.mirror(r, records, outbox.settled(cx, extra))
        except ServiceError as exc:
            log.warning("parked list from the outbox; Redis copy not repaired: %s", exc)
        else:
            if mirrored["restored"] or mirrored["dropped"]:
                log.warning("Redis parked copy repaired from the outbox: %s", mirrored)
    return records


def show_parked(key: str) -> dict:
    """One parked write: the outbox row (the truth) and its Redis copy (None if lost)."""
    with db.connect() as cx:
        row = outbox.get(cx, key)
    try:
        record = parking.show(parking.client(), key)
    except ServiceError as exc:
        log.warning("Redis copy of %s unavailable: %s", key, exc)
        record = None
    if row is None and record is None:
        raise BillingError(f"no parked write with key {key!r}")
    return {"redis": record, "outbox": row}


def retry_parked(
    keys: Sequence[str] | None = None,
    *,
    all: bool = False,
    engine: Engine | None = None,
    sleep: Sleep | None = None,
) -> dict:
    """Re-send parked writes (``keys`` or ``all``); also sends what they were blocking."""
    if not keys and not all:
        raise BillingError("name the parked keys to retry, or retry all")
    eng = _engine(engine, sleep)
    if eng.read_only():
        raise BillingError(
            "Stripe is read-only ('billing stripe read-only status'); switch it off first"
        )
    r = eng.redis
    wanted = None if all else list(keys or ())
    with db.transaction() as cx:
        ids = outbox.requeue(cx, wanted)
        orgs = [
            o
            for (o,) in cx.execute(
                "SELECT DISTINCT org_id FROM billing.stripe_outbox WHERE outbox_id = ANY(%s)",
                (ids,),
            ).fetchall()
        ]
        # Redis entries whose outbox row is already sent (a crash between the two writes).
        stale = [
            k
            for k in (parking.parked(r) if all else wanted)
            if (row := outbox.get(cx, k)) is not None and row["status"] == "sent"
        ]
    unknown = [] if all else [k for k in wanted if k not in stale and not _exists(k)]
    for k in stale:
        parking.unpark(r, k)
    result = eng.drain(orgs=orgs) if orgs else {"sent": 0, "adopted": 0, "parked": 0}
    return {"requeued": len(ids), "cleared_stale": len(stale), "unknown": unknown, **result}


def _exists(key: str) -> bool:
    with db.connect() as cx:
        return outbox.get(cx, key) is not None


# ------------------------------------------------------------------ outage mode
def read_only() -> dict | None:
    """The read-only flag's details (since, reason) when on, else None (from Postgres)."""
    return mode.info()


def set_read_only(on: bool, reason: str = "") -> None:
    mode.set_mode(on, reason)


def counters() -> dict:
    """Durable push counters (from the outbox) for export."""
    with db.connect() as cx:
        return outbox.counters(cx)
