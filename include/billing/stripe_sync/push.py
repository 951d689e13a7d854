"""Planning Stripe writes from the invoice snapshot: daily overage items, base fees, invoices.

For run day D of period P, an org's item for a metric is ``C_now(D) - pushed`` where
``C_now(D)`` is the snapshot's cumulative charge through D (recomputed with every event
known now) and ``pushed`` is everything already in the outbox for that org/metric/P, sent
or not. Late events are therefore absorbed in the current day's item; past items are never
rewritten. The amount is negative when the month's usage now prices lower (a cheaper volume
tier, a latest value that fell): Stripe takes it as a credit item on the same invoice. A day at or before the last planned day of an org/metric plans nothing, so
re-runs and backfills are harmless.

Late events can also change an earlier period that is still inside the lateness window
(its Stripe invoice may already be finalized). Day D then also pushes, for each such
period P, ``C_now(last day of P) - pushed(P)``: an item tagged with period P that Stripe
collects on the next invoice, so every period's items still add up to its snapshot. Once
P's Stripe invoice is finalized, a negative difference becomes a credit note against it and
a positive one a "Correction for P" item (``corrections.route``; docs/MONTH_CLOSE.md).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from billing.platform.dates import month_end, period_of
from billing.pricing.catalog import is_metric_label
from billing.stripe_sync import credit_items, snapshot
from billing.stripe_sync.corrections import route as route_corrections
from billing.stripe_sync.outbox import Write, key_for


def _metadata(
    key: str,
    kind: str,
    org_id: str,
    period: dt.date,
    day: dt.date | None = None,
    metric: str | None = None,
) -> dict[str, str]:
    meta = {
        "org_id": org_id,
        "period": period.strftime("%Y-%m"),
        "kind": kind,
        "idempotency_key": key,
    }
    if day is not None:
        meta["day"] = day.isoformat()
    if metric is not None:
        meta["metric"] = metric
    return meta


def customer_write(org: dict, period: dt.date) -> Write:
    key = f"billing:customer:{org['org_id']}"
    payload = {
        "metadata": {"org_id": org["org_id"], "idempotency_key": key},
        **({"name": org["name"]} if org.get("name") else {}),
        **({"email": org["email"]} if org.get("email") else {}),
    }
    return Write(key, "customer", org["org_id"], period, payload)


def plan_customers(cx, org_ids: set[str], period: dt.date) -> list[Write]:
    """Customer writes for orgs without a Stripe customer (created on first need)."""
    if not org_ids:
        return []
    rows = cx.execute(
        """SELECT o.org_id, g.name, g.email FROM unnest(%s::text[]) AS o(org_id)
             LEFT JOIN billing.organizations g USING (org_id)
            WHERE NOT EXISTS (SELECT 1 FROM billing.stripe_customers c WHERE c.org_id = o.org_id)
            ORDER BY o.org_id""",
        (sorted(org_ids),),
    ).fetchall()
    return [customer_write({"org_id": r[0], "name": r[1], "email": r[2]}, period) for r in rows]


def periods_open_for(day: dt.date, lateness_days: int | None = None) -> list[dt.date]:
    """Periods whose usage can still change on run day ``day``: its own, and earlier ones
    that ended within the lateness window (oldest first)."""
    from billing.platform import settings

    window = settings.lateness_days() if lateness_days is None else lateness_days
    oldest = period_of(day - dt.timedelta(days=window))
    periods, p = [], period_of(day)
    while p >= oldest:
        periods.append(p)
        p = period_of(p - dt.timedelta(days=1))
    return sorted(periods)


def plan_day(cx, day: dt.date) -> list[Write]:
    """The writes run day ``day`` adds: customers first, then base fees, then usage items."""
    period = period_of(day)
    items: list[Write] = []
    for p in periods_open_for(day):
        through = day if p == period else month_end(p)
        items += _usage_items(cx, p, day, through)
        if day >= month_end(p):  # its last day ran: minimum spend and commitment true-ups
            items += _true_up_items(cx, p, day)
        items += _base_fee_adjustments(cx, p, day)
    fees: list[Write] = []
    for b in snapshot.base_fees(cx, period):
        if b.base_fee_cents <= 0:
            continue
        key = key_for("base", b.org_id, period)
        fees.append(
            Write(
                key,
                "base_fee",
                b.org_id,
                period,
                {
                    "amount": b.base_fee_cents,
                    "currency": b.currency,
                    "description": f"{b.plan} base fee {period:%Y-%m}",
                    "metadata": _metadata(key, "base_fee", b.org_id, period),
                },
                amount_cents=b.base_fee_cents,
                currency=b.currency,
            )
        )
    # earlier periods whose invoice is finalized: credit notes / correction items instead
    items = route_corrections(cx, items, day)
    orgs = {w.org_id for w in items} | {w.org_id for w in fees}
    return plan_customers(cx, orgs, period) + fees + items


def _usage_items(cx, period: dt.date, day: dt.date, through: dt.date) -> list[Write]:
    """Items for ``period`` on run day ``day``: C_now(through) minus what was pushed."""
    pushed: dict[tuple[str, str], tuple[int, dt.date]] = {
        (org, metric): (int(total), last)
        for org, metric, total, last in cx.execute(
            """SELECT org_id, metric, sum(amount_cents), max(day) FROM billing.stripe_outbox
                WHERE kind IN ('usage_item', 'credit_note') AND period = %s
                  AND status <> 'cancelled'
                GROUP BY org_id, metric""",
            (period,),
        ).fetchall()
    }
    current = snapshot.cumulative_through(cx, period, through)
    # a charge the snapshot no longer has (a plan change undone, a segment gone) goes back to
    # 0: what was pushed for it is taken back
    seen = {(c.org_id, c.metric) for c in current}
    currency = {
        o: cur
        for o, cur in cx.execute(
            "SELECT org_id, min(currency) FROM billing.stripe_outbox WHERE period = %s"
            " AND currency IS NOT NULL GROUP BY org_id",
            (period,),
        ).fetchall()
    }
    gone = [
        snapshot.Cumulative(org, label, currency.get(org, ""), 0)
        for (org, label), (total, _last) in sorted(pushed.items())
        if (org, label) not in seen and total != 0 and is_metric_label(label)
    ]
    items: list[Write] = []
    for c in [*current, *gone]:
        total, last = pushed.get((c.org_id, c.metric), (0, None))
        if last is not None and last >= day:
            continue
        amount = c.cumulative_charge_cents - total
        if amount == 0:
            continue
        items.append(
            _item(
                c.org_id,
                period,
                day,
                c.metric,
                amount,
                c.currency,
                f"{c.metric} usage {day.isoformat()}"
                # a negative item is a credit (Stripe accepts negative invoice items): say
                # why on the customer's invoice
                + (" (credit: the month's usage now prices lower)" if amount < 0 else ""),
            )
        )
    return items


def _item(
    org: str, period: dt.date, day: dt.date, label: str, amount: int, currency: str, text: str
) -> Write:
    """A ``usage_item`` write of run day ``day``: one charge label's difference."""
    key = key_for("usage", org, period, day, label)
    return Write(
        key,
        "usage_item",
        org,
        period,
        {
            "amount": amount,
            "currency": currency,
            "description": text,
            "metadata": _metadata(key, "usage_item", org, period, day, label),
        },
        day=day,
        metric=label,
        amount_cents=amount,
        currency=currency,
    )


def _true_up_items(cx, period: dt.date, day: dt.date) -> list[Write]:
    """True-up items of a ``period`` whose last day ran (the run of that day pushes them, so
    the month close that follows finalizes the invoice with them): each true-up line minus
    what was pushed for it
    (a later correction, e.g. late usage that reached the minimum, pushes the difference,
    negative included). Usage items to Stripe, labelled ``minimum_spend.<metric>`` /
    ``minimum_commitment``, so closing, reconciliation and adoption treat them alike."""
    pushed: dict[tuple[str, str], tuple[int, dt.date, str]] = {
        (org, label): (int(total), last, currency)
        for org, label, total, last, currency in cx.execute(
            """SELECT org_id, metric, sum(amount_cents), max(day), min(currency)
                 FROM billing.stripe_outbox
                WHERE kind IN ('usage_item', 'credit_note') AND period = %s
                  AND status <> 'cancelled'
                  AND (starts_with(metric, 'minimum_spend.')
                       OR starts_with(metric, 'minimum_commitment'))
                GROUP BY org_id, metric""",
            (period,),
        ).fetchall()
    }
    wanted = {(t.org_id, t.metric): t for t in snapshot.true_ups(cx, period)}
    items: list[Write] = []
    for org, label in sorted(wanted.keys() | pushed.keys()):
        total, last, currency = pushed.get((org, label), (0, None, None))
        if last is not None and last >= day:
            continue
        line = wanted.get((org, label))
        amount = (line.cumulative_charge_cents if line else 0) - total
        if amount == 0:
            continue
        currency = line.currency if line else currency
        items.append(
            _item(org, period, day, label, amount, currency, f"{label} true-up {period:%Y-%m}")
        )
    return items


def _base_fee_adjustments(cx, period: dt.date, day: dt.date) -> list[Write]:
    """Base fee items of ``period`` after its first: the period's base fee is pushed once,
    as it stood on the first run day; a subscription change later (a plan change or
    cancellation, docs/SUBSCRIPTIONS.md) prorates it anew, and the difference goes to Stripe
    as an item labelled ``base_fee`` (negative when it fell), like a usage correction."""
    pushed = {
        org: (int(total), last, currency)
        for org, total, last, currency in cx.execute(
            """SELECT org_id, sum(amount_cents), max(day), min(currency)
                 FROM billing.stripe_outbox
                WHERE period = %s AND status <> 'cancelled'
                  AND (kind = 'base_fee' OR (kind IN ('usage_item', 'credit_note')
                                             AND metric = 'base_fee'))
                GROUP BY org_id
               HAVING bool_or(kind = 'base_fee')""",
            (period,),
        ).fetchall()
    }
    if not pushed:
        return []
    wanted = {b.org_id: b for b in snapshot.base_fees(cx, period)}
    items: list[Write] = []
    for org in sorted(pushed):
        total, last, currency = pushed[org]
        if last is not None and last >= day:
            continue
        fee = wanted.get(org)
        amount = (fee.base_fee_cents if fee else 0) - total
        if amount == 0:
            continue
        currency = fee.currency if fee else currency
        text = f"base fee {period:%Y-%m} prorated anew (subscription change)"
        items.append(_item(org, period, day, "base_fee", amount, currency, text))
    return items


def plan_close(cx, period: dt.date, days_until_due: int) -> tuple[list[Write], dict[str, str]]:
    """Invoice + finalize writes for orgs whose period's items are all in Stripe.

    The invoice excludes pending items; its finalize attaches the org's pending items of
    ``period`` and earlier (Engine._attach_items), never a later period's. Returns the writes and, per org left out, why (its items are still queued or parked).
    """
    states: dict[str, set[str]] = defaultdict(set)
    currency: dict[str, str] = {}
    for org, status, cur in cx.execute(
        """SELECT DISTINCT org_id, status, currency FROM billing.stripe_outbox
            WHERE period = %s AND kind IN ('usage_item', 'base_fee') AND status <> 'cancelled'""",
        (period,),
    ).fetchall():
        states[org].add(status)
        if cur:
            currency[org] = cur
    writes: list[Write] = []
    blocked: dict[str, str] = {}
    for org in sorted(states):
        open_states = states[org] - {"sent"}
        if open_states:
            blocked[org] = f"items still {', '.join(sorted(open_states))}"
            continue
        # prepaid credits first (claimed once), so the finalize attaches them
        writes += credit_items.plan(cx, org, period, currency.get(org))
        key = key_for("invoice", org, period)
        writes.append(
            Write(
                key,
                "invoice",
                org,
                period,
                {
                    "collection_method": "send_invoice",
                    "days_until_due": days_until_due,
                    "auto_advance": False,
                    # Never sweep pending items in: the finalize write attaches this
                    # period's (and earlier periods' late) items explicitly, so next
                    # month's items, already pushed, stay pending for their own invoice.
                    "pending_invoice_items_behavior": "exclude",
                    **({"currency": currency[org]} if org in currency else {}),
                    "description": f"Usage and subscription {period:%Y-%m}",
                    "metadata": _metadata(key, "invoice", org, period),
                },
            )
        )
        writes.append(Write(key_for("finalize", org, period), "finalize", org, period, {}))
    return writes, blocked
