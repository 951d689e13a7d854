"""Prepaid credits at the month close: negative invoice items, planned once per invoice.

``push.plan_close`` calls :func:`plan` for each org whose invoice it is about to plan, in
the close's transaction (under the planning lock): the credit items are enqueued before the
invoice and finalize writes, so the finalize attaches them (``Engine._attach_items``: the
org's pending items of the period or earlier). The claim rows
(``billing.credit_applications``, :func:`billing.credits.record`) are written in the same
transaction as the outbox rows, and nothing is planned once the org's invoice write exists,
so a retried, cleared or backfilled close applies nothing twice.
"""

from __future__ import annotations

import datetime as dt

from billing import credits
from billing.stripe_sync.outbox import Write, key_for

# The outbox kinds that become lines of the org's invoice (the credit item itself aside).
ITEM_KINDS = ("usage_item", "base_fee")
DESCRIPTION_REASON_MAX = 120


def invoice_total(cx, org_id: str, period: dt.date) -> int:
    """What the org's ``period`` invoice will hold: its sent items of the period, plus late
    items of earlier periods sent after the org's last finalize (the finalize attaches those
    too). Minor units, in the items' currency."""
    row = cx.execute(
        """WITH last_finalize AS (
               SELECT max(sent_at) AS at FROM billing.stripe_outbox
                WHERE org_id = %(org)s AND kind = 'finalize' AND period < %(p)s
                  AND status = 'sent')
           SELECT coalesce(sum(o.amount_cents), 0) FROM billing.stripe_outbox o, last_finalize f
            WHERE o.org_id = %(org)s AND o.kind = ANY(%(kinds)s) AND o.status = 'sent'
              AND (o.period = %(p)s
                   OR (o.period < %(p)s AND (f.at IS NULL OR o.sent_at > f.at)))""",
        {"org": org_id, "p": period, "kinds": list(ITEM_KINDS)},
    ).fetchone()
    return int(row[0])


def key(org_id: str, period: dt.date, grant_id: int) -> str:
    return key_for("credit", org_id, period, metric=f"grant.{grant_id}")


def plan(cx, org_id: str, period: dt.date, currency: str | None) -> list[Write]:
    """The org's credit items for its ``period`` invoice, claimed; none if its invoice was
    already planned (a re-run) or it has no usable credit."""
    if cx.execute(
        "SELECT 1 FROM billing.stripe_outbox WHERE idempotency_key = %s",
        (key_for("invoice", org_id, period),),
    ).fetchone():
        return []
    if currency is None:
        found = cx.execute(
            "SELECT currency FROM billing.organizations WHERE org_id = %s", (org_id,)
        ).fetchone()
        if found is None:
            return []
        currency = found[0]
    currency = currency.strip().lower()
    applications = credits.plan(cx, org_id, period, invoice_total(cx, org_id, period), currency)
    writes = []
    for a in applications:
        k = key(org_id, period, a.grant_id)
        reason = a.reason if len(a.reason) <= DESCRIPTION_REASON_MAX else a.reason[:119] + "…"
        writes.append(
            Write(
                k,
                "credit",
                org_id,
                period,
                {
                    "amount": -a.amount_cents,
                    "currency": currency,
                    "description": f"Prepaid credit (grant {a.grant_id}: {reason})",
                    "metadata": {
                        "org_id": org_id,
                        "period": f"{period:%Y-%m}",
                        "kind": "credit",
                        "grant_id": str(a.grant_id),
                        "idempotency_key": k,
                    },
                },
                amount_cents=-a.amount_cents,
                currency=currency,
            )
        )
    credits.record(cx, [(a, w.idempotency_key) for a, w in zip(applications, writes, strict=True)])
    return writes
