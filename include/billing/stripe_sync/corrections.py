"""Corrections of a period whose Stripe invoice is already finalized.

A finalized invoice can no longer take items, so a change of an earlier period P (late
events inside the lateness window, or ``billing rerate``) is corrected by label (a charge,
a true-up line, ``base_fee``):

* **over-billed** (want − billed < 0): a **credit note** against P's Stripe invoice (outbox
  kind ``credit_note``, ``amount_cents`` negative so the per-label ``pushed`` sums stay
  right; the engine resolves the invoice id when it sends). Stripe lets a credit note take
  at most what the invoice can still credit: ``amount_remaining`` when it is open, what was
  paid when it is paid (less earlier credit notes), nothing when it is uncollectible or
  void. Whatever exceeds that is carried as a negative correction item on the next invoice.
* **under-billed** (> 0): an item tagged ``metadata.period = P`` and
  ``metadata.correction_of = P``, described "Correction for P: label"; the next finalize
  attaches it (``Engine._attach_items``) and reconciliation counts it for P.

``plan_day`` routes its earlier-period items through :func:`route`; ``billing rerate``
(:func:`rerate`) rebuilds a period in the snapshot and plans the same writes for the
difference between the snapshot and everything in the outbox (sent or queued).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from billing.platform.dates import month_end, period_of
from billing.platform.errors import ConfigError
from billing.stripe_sync import snapshot
from billing.stripe_sync.outbox import Write, key_for

log = logging.getLogger(__name__)

BASE_FEE_LABEL = "base_fee"  # the base fee's label (its outbox rows have no metric)
# Outbox kinds that bill a period's lines (prepaid credits, kind 'credit', are not a line).
BILLED_KINDS = ("usage_item", "base_fee", "credit_note")


@dataclass(frozen=True)
class FinalizedInvoice:
    """Our record of an org's Stripe invoice for a period (billing.stripe_invoices)."""

    stripe_invoice_id: str
    status: str
    amount_remaining_cents: int
    amount_paid_cents: int


def finalized(
    cx, period: dt.date, org_ids: Iterable[str] | None = None
) -> dict[str, FinalizedInvoice]:
    """The orgs whose Stripe invoice for ``period`` is no longer a draft."""
    rows = cx.execute(
        """SELECT org_id, stripe_invoice_id, status, coalesce(amount_remaining_cents, 0),
                  coalesce(amount_paid_cents, 0)
             FROM billing.stripe_invoices WHERE period = %s AND status <> 'draft'""",
        (period,),
    ).fetchall()
    wanted = None if org_ids is None else set(org_ids)
    return {r[0]: FinalizedInvoice(*r[1:]) for r in rows if wanted is None or r[0] in wanted}


def creditable(cx, org_id: str, period: dt.date, invoice: FinalizedInvoice) -> int:
    """What a new credit note against the invoice may still take, as planned now.

    Open: ``amount_remaining`` (refreshed after each credit note is sent) less the credit
    notes still queued. Paid: what was paid less every credit note of the period
    (conservative: pre-payment notes already lowered what was paid). Otherwise 0."""
    if invoice.status not in ("open", "paid"):
        return 0
    states = ("pending", "parked") if invoice.status == "open" else ("pending", "parked", "sent")
    (queued,) = cx.execute(
        """SELECT coalesce(-sum(amount_cents), 0) FROM billing.stripe_outbox
            WHERE kind = 'credit_note' AND org_id = %s AND period = %s AND status = ANY(%s)""",
        (org_id, period, list(states)),
    ).fetchone()
    base = invoice.amount_remaining_cents if invoice.status == "open" else invoice.amount_paid_cents
    return max(0, base - int(queued))


def _meta(key: str, kind: str, org_id: str, period: dt.date, label: str, day: dt.date | None):
    meta = {
        "org_id": org_id,
        "period": f"{period:%Y-%m}",
        "kind": kind,
        "idempotency_key": key,
        "metric": label,
        "correction_of": f"{period:%Y-%m}",
    }
    if day is not None:
        meta["day"] = day.isoformat()
    return meta


def _description(period: dt.date, label: str) -> str:
    return f"Correction for {period:%Y-%m}: {label}"


def credit_note_write(
    key: str, org_id: str, period: dt.date, label: str, cents: int, currency: str, day=None
) -> Write:
    """A credit note of ``cents`` (> 0) against the org's invoice for ``period``."""
    return Write(
        key,
        "credit_note",
        org_id,
        period,
        {
            "lines": [
                {
                    "type": "custom_line_item",
                    "unit_amount": cents,
                    "quantity": 1,
                    "description": _description(period, label),
                }
            ],
            "memo": f"Usage of {period:%Y-%m} re-rated: {label} was over-billed.",
            "metadata": _meta(key, "credit_note", org_id, period, label, day),
        },
        day=day,
        metric=label,
        amount_cents=-cents,
        currency=currency,
    )


def item_write(
    key: str, org_id: str, period: dt.date, label: str, cents: int, currency: str, day=None
) -> Write:
    """A correction item of ``cents`` (either sign) tagged with ``period``, for the next invoice."""
    description = _description(period, label)
    if cents < 0:
        description += " (credit beyond what the invoice can still credit)"
    return Write(
        key,
        "usage_item",
        org_id,
        period,
        {
            "amount": cents,
            "currency": currency,
            "description": description,
            "metadata": _meta(key, "usage_item", org_id, period, label, day),
        },
        day=day,
        metric=label,
        amount_cents=cents,
        currency=currency,
    )


class _Capacity:
    """What each finalized invoice can still credit, decremented as notes are planned."""

    def __init__(self, cx, period: dt.date, invoices: dict[str, FinalizedInvoice]):
        self.cx, self.period, self.invoices = cx, period, invoices
        self.left: dict[str, int] = {}

    def take(self, org_id: str, wanted: int) -> int:
        if org_id not in self.left:
            self.left[org_id] = creditable(self.cx, org_id, self.period, self.invoices[org_id])
        got = min(wanted, self.left[org_id])
        self.left[org_id] -= got
        return got


def plan(
    capacity: _Capacity,
    org_id: str,
    period: dt.date,
    label: str,
    cents: int,
    currency: str,
    *,
    keys: tuple[str, str],
    day: dt.date | None = None,
) -> list[Write]:
    """The writes correcting ``label`` of a finalized ``period`` by ``cents``.

    ``keys``: (credit note key, item key); both deterministic, so planning twice inserts
    nothing twice."""
    if cents == 0:
        return []
    note_key, item_key = keys
    if cents > 0:
        return [item_write(item_key, org_id, period, label, cents, currency, day)]
    credited = capacity.take(org_id, -cents)
    writes = []
    if credited:
        writes.append(credit_note_write(note_key, org_id, period, label, credited, currency, day))
    rest = cents + credited  # what the invoice cannot credit: a negative item on the next one
    if rest:
        writes.append(item_write(item_key, org_id, period, label, rest, currency, day))
    return writes


def route(cx, writes: list[Write], day: dt.date) -> list[Write]:
    """``plan_day``'s items of earlier periods whose org's Stripe invoice is finalized,
    turned into corrections (a credit note when negative, a labelled item when positive);
    every other write unchanged."""
    current = period_of(day)
    out: list[Write] = []
    invoices: dict[dt.date, dict[str, FinalizedInvoice]] = {}
    capacities: dict[dt.date, _Capacity] = {}
    for w in writes:
        if w.kind != "usage_item" or w.period >= current:
            out.append(w)
            continue
        if w.period not in invoices:
            invoices[w.period] = finalized(cx, w.period)
            capacities[w.period] = _Capacity(cx, w.period, invoices[w.period])
        if w.org_id not in invoices[w.period]:
            out.append(w)  # its invoice is still a draft (or none yet): a plain late item
            continue
        out += plan(
            capacities[w.period],
            w.org_id,
            w.period,
            w.metric,
            w.amount_cents,
            w.currency,
            keys=(
                key_for("credit_note", w.org_id, w.period, day, w.metric),
                w.idempotency_key,
            ),
            day=day,
        )
    return out


# ---------------------------------------------------------------- billing rerate
@dataclass(frozen=True)
class Diff:
    org_id: str
    label: str
    currency: str
    billed_cents: int  # everything in the outbox for the period and label, sent or queued
    want_cents: int  # the rebuilt snapshot's line amount

    @property
    def diff_cents(self) -> int:
        return self.want_cents - self.billed_cents


def wanted(cx, period: dt.date) -> dict[tuple[str, str], tuple[int, str]]:
    """(org, label) -> (cents, currency): the snapshot's lines, through snapshot.py's readers."""
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for c in snapshot.cumulative_through(cx, period, month_end(period)):
        out[(c.org_id, c.metric)] = (c.cumulative_charge_cents, c.currency)
    for t in snapshot.true_ups(cx, period):
        out[(t.org_id, t.metric)] = (t.cumulative_charge_cents, t.currency)
    for b in snapshot.base_fees(cx, period):
        if b.base_fee_cents:
            out[(b.org_id, BASE_FEE_LABEL)] = (b.base_fee_cents, b.currency)
    return out


def billed(cx, period: dt.date) -> dict[tuple[str, str], tuple[int, str]]:
    """(org, label) -> (cents, currency): the outbox's writes for ``period``, any status but
    cancelled (queued writes count: they will be sent)."""
    rows = cx.execute(
        """SELECT org_id, coalesce(metric, %s), sum(amount_cents), min(lower(currency))
             FROM billing.stripe_outbox
            WHERE period = %s AND kind = ANY(%s) AND status <> 'cancelled'
            GROUP BY 1, 2""",
        (BASE_FEE_LABEL, period, list(BILLED_KINDS)),
    ).fetchall()
    return {(org, label): (int(total), cur) for org, label, total, cur in rows}


def diff(cx, period: dt.date, org_id: str | None = None) -> list[Diff]:
    """Per org (invoiced in Stripe for ``period``) and label: what was billed, what the
    snapshot wants, including lines that are zero now on either side."""
    want, have = wanted(cx, period), billed(cx, period)
    invoiced = {
        r[0]
        for r in cx.execute(
            "SELECT org_id FROM billing.stripe_invoices WHERE period = %s", (period,)
        ).fetchall()
    }
    out = []
    for org, label in sorted(want.keys() | have.keys()):
        if org not in invoiced or (org_id is not None and org != org_id):
            continue
        w_cents, w_cur = want.get((org, label), (0, None))
        b_cents, b_cur = have.get((org, label), (0, None))
        out.append(Diff(org, label, w_cur or b_cur, b_cents, w_cents))
    return out


def rebuild_period(period: dt.date) -> None:
    """Re-price ``period`` from the raw events with the catalog and subscriptions in force
    then: the postgres dbt build with ``rerate_periods`` (int_periods_affected), then the
    publish, as the nightly does.

    The build's arrival window runs from the period's first day to the end of its lateness
    window (never past the last nightly day, so no later month is priced early), so every
    usage day of the period is re-aggregated from ``billing.usage_events``."""
    from billing.platform import db, settings
    from billing.transform import project

    end = month_end(period)
    with db.connect() as cx:
        project.prepare(cx)
        (last_day,) = cx.execute("SELECT max(arrival_day) FROM billing.nightly_days").fetchone()
    late_end = end + dt.timedelta(days=settings.lateness_days())
    day = max(end, min(late_end, last_day or end))
    project.run_dbt(
        "postgres",
        "build",
        # no pinned version: each day of the period is priced by the catalog version in
        # force on it (docs/SUBSCRIPTIONS.md "Catalog versions")
        vars=project.run_vars(day, period, extra={"rerate_periods": [period]}),
    )
    project.publish_snapshot()


def _check(cx, period: dt.date, org_id: str | None) -> None:
    if (
        org_id is not None
        and not cx.execute(
            "SELECT 1 FROM billing.organizations WHERE org_id = %s", (org_id,)
        ).fetchone()
    ):
        raise ConfigError(f"unknown org {org_id!r}")
    q = "SELECT 1 FROM billing.stripe_invoices WHERE period = %s"
    params: list = [period]
    if org_id is not None:
        q += " AND org_id = %s"
        params.append(org_id)
    if not cx.execute(q, params).fetchone():
        who = f" for org {org_id!r}" if org_id else ""
        raise ConfigError(
            f"no Stripe invoice for {period:%Y-%m}{who}: nothing was billed to re-rate"
        )


def _rerate_keys(d: Diff, period: dt.date) -> tuple[str, str]:
    """Deterministic per correction: the same diff (billed -> want) always gets the same keys."""
    suffix = f":{d.billed_cents}:{d.want_cents}"
    return (
        key_for("rerate_credit_note", d.org_id, period, metric=d.label) + suffix,
        key_for("rerate_item", d.org_id, period, metric=d.label) + suffix,
    )


def plan_rerate(cx, period: dt.date, diffs: Sequence[Diff]) -> list[Write]:
    """The corrections for ``diffs`` (same rules as :func:`route`; a draft invoice takes a
    plain item, which its finalize attaches)."""
    invoices = finalized(cx, period)
    capacity = _Capacity(cx, period, invoices)
    writes: list[Write] = []
    for d in diffs:
        if d.diff_cents == 0:
            continue
        keys = _rerate_keys(d, period)
        if d.org_id in invoices:
            writes += plan(capacity, d.org_id, period, d.label, d.diff_cents, d.currency, keys=keys)
        else:
            writes.append(item_write(keys[1], d.org_id, period, d.label, d.diff_cents, d.currency))
    return writes


def rerate(
    period: dt.date,
    org_id: str | None = None,
    *,
    apply: bool = False,
    rebuild: bool = True,
    engine=None,
) -> dict:
    """``billing rerate``: rebuild ``period`` in the snapshot, diff it against what was
    billed, and with ``apply`` enqueue the corrections and send them (outage mode queues)."""
    from billing.platform import db
    from billing.stripe_sync import outbox

    period = period_of(period)
    with db.connect() as cx:
        _check(cx, period, org_id)
    if rebuild:
        rebuild_period(period)
    with db.transaction() as cx:
        cx.execute("SELECT pg_advisory_xact_lock(hashtext('billing.stripe_sync.plan'))")
        diffs = diff(cx, period, org_id)
        writes = plan_rerate(cx, period, diffs)
        inserted = outbox.enqueue(cx, writes) if apply else []  # a dry run writes nothing
    result = {
        "period": f"{period:%Y-%m}",
        "org_id": org_id,
        "applied": apply,
        "diffs": [{**asdict(d), "diff_cents": d.diff_cents} for d in diffs],
        "corrections": [
            {
                "org_id": w.org_id,
                "label": w.metric,
                "kind": w.kind,
                "amount_cents": w.amount_cents,
                "currency": w.currency,
                "idempotency_key": w.idempotency_key,
                "enqueued": w.idempotency_key in inserted,
            }
            for w in writes
        ],
    }
    if apply and inserted:
        from billing.stripe_sync.engine import Engine

        result["drain"] = (engine or Engine()).drain()
    return result
